"""``robustkit mix``: combine a standard and a robust model into one mixed classifier (adaptive smoothing).

    robustkit mix --standard runs/std --robust runs/trades --alpha 0.5 --out models/mix
    robustkit mix --standard runs/std --robust runs/trades --mixing-net --out models/mix-net
    robustkit train --pretrained models/mix-net --defense adaptive-smoothing --param preset=mnist ...

The output is a normal model directory (``model.safetensors`` + ``model.json``, arch ``mix``) that every
command loads (``attack``, ``benchmark``, ``eval``, ``certify``, ``reject``). See ``robustkit.mix``.
"""

from __future__ import annotations

import argparse

from robustkit.commands._common import add_common, setup


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("mix", help="mix a standard and a robust model (adaptive smoothing, Bai et al. 2024)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--standard", required=True, help="run or model directory of the accurate (standard) model")
    p.add_argument("--robust", required=True, help="run or model directory of the robust model")
    p.add_argument("--alpha", type=float, default=0.5, help="fixed weight of the robust model in [0, 1] (default 0.5)")
    p.add_argument("--mixing-net", action="store_true", help="learned alpha(x): add a mixing network (train it with "
                   "--defense adaptive-smoothing)")
    p.add_argument("--std-layer", help="mixing net: the standard member's feature layer (default: penultimate)")
    p.add_argument("--rob-layer", help="mixing net: the robust member's feature layer (default: penultimate)")
    p.add_argument("--width", type=int, default=32, help="mixing net width (default 32)")
    p.add_argument("--alpha-min", type=float, default=0.0, help="mixing net: smallest alpha in eval mode")
    p.add_argument("--alpha-max", type=float, default=1.0, help="mixing net: largest alpha in eval mode")
    p.add_argument("--std-scale", type=float, default=1.0, help="scale of the standard member's logits")
    p.add_argument("--rob-scale", type=float, default=1.0, help="scale of the robust member's logits")
    p.add_argument("--out", required=True, help="output model directory")
    add_common(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from robustkit.app.sharded_eval import check_output_dir
    from robustkit.mix import mix_model
    from robustkit.zoo import load, save

    check_output_dir(args.out)
    device = setup(args)
    std, rob = load(args.standard, map_location=device), load(args.robust, map_location=device)
    opts = {"std_scale": args.std_scale, "rob_scale": args.rob_scale}
    if args.mixing_net:
        opts.update(std_layer=args.std_layer, rob_layer=args.rob_layer, width=args.width, alpha_min=args.alpha_min,
                    alpha_max=args.alpha_max)
    model = mix_model(std, rob, alpha=args.alpha, mixing_net=args.mixing_net, **opts)
    path = save(model, args.out)
    kind = "a mixing network" if args.mixing_net else f"alpha={args.alpha:g}"
    print(f"mixed {std.arch} (standard) and {rob.arch} (robust) with {kind}: {path}/model.json")
    return 0
