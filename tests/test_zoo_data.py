import json

import pytest
import torch

from robustkit.data import crop_flip, dataset_info, load_data, make_loader
from robustkit.errors import CheckpointError, DatasetError
from robustkit.registry import MODELS
from robustkit.zoo import RobustModel, create, from_pretrained_file, load, save

SHAPES = {"ibp-small": (1, 28, 28), "ibp-medium": (1, 28, 28), "ibp-large": (1, 28, 28), "lenet": (1, 28, 28),
          "preact-resnet18": (3, 32, 32), "wrn": (3, 32, 32), "wrn-28-10": (3, 32, 32), "wrn-34-10": (3, 32, 32)}
SHAPES.update({"dual-subimage": (1, 28, 28), "denoised": (1, 28, 28), "sll-small": (1, 28, 28),
               "liresnet-small": (1, 28, 28), "mix": (1, 28, 28)})
KW = {"wrn": {"depth": 10, "widen_factor": 1}, "denoised": {"depth": 3, "width": 8},
      "mix": {"mixing_net": True, "alpha": None, "width": 4}}


@pytest.mark.parametrize("arch", MODELS.names())
def test_builtin_roundtrip(arch, tmp_path):
    if arch in ("wrn-28-10", "wrn-34-10"):  # big: check construction only, via meta tensors
        with torch.device("meta"):
            m = create(arch, 10, SHAPES[arch])
        assert isinstance(m, RobustModel)
        return
    torch.manual_seed(0)
    m = create(arch, 10, SHAPES[arch], mean=[0.1] * SHAPES[arch][0], std=[0.3] * SHAPES[arch][0],
               **KW.get(arch, {})).eval()
    x = torch.rand(2, *SHAPES[arch])
    save(m, tmp_path / "m")
    assert (tmp_path / "m" / "model.safetensors").is_file() and (tmp_path / "m" / "model.json").is_file()
    m2 = load(tmp_path / "m")
    assert torch.equal(m(x), m2(x))
    assert m2.mean == (0.1,) * SHAPES[arch][0] and m2.arch == arch


@pytest.mark.parametrize("arch,shape", [("resnet18", (3, 32, 32)), ("tv:resnet18", (3, 32, 32)),
                                        ("tv:squeezenet1_0", (3, 64, 64))])
def test_timm_torchvision_roundtrip(arch, shape, tmp_path):
    torch.manual_seed(0)
    m = create(arch, 7, shape).eval()
    assert m.num_classes == 7 and len(m.mean) == 3 and m.std[0] < 1  # ImageNet statistics by default
    x = torch.rand(2, *shape)
    save(m, tmp_path)
    assert torch.allclose(m(x), load(tmp_path)(x))


def test_residual_nets_share_one_block_and_keep_their_checkpoint_layout():
    """PreAct ResNet-18 and WideResNet are built from the one pre-activation block; the state-dict
    keys and sizes are those of the checkpoints saved before the two block classes were merged."""
    from robustkit.nets import PreActBlock

    wrn = create("wrn", 10, (3, 32, 32), depth=10, widen_factor=2).net
    pre = create("preact-resnet18", 10, (3, 32, 32)).net
    assert {type(b) for b in wrn.blocks} == {type(b) for b in pre.layers} == {PreActBlock}
    w, p = wrn.state_dict(), pre.state_dict()
    bn = ["weight", "bias", "running_mean", "running_var", "num_batches_tracked"]
    assert [k for k in w if k.startswith("blocks.0.")] == [
        *(f"blocks.0.bn1.{k}" for k in bn), "blocks.0.conv1.weight", *(f"blocks.0.bn2.{k}" for k in bn),
        "blocks.0.conv2.weight", "blocks.0.shortcut.weight"]
    assert [k for k in w if "shortcut" in k] == [f"blocks.{i}.shortcut.weight" for i in (0, 1, 2)]
    assert tuple(w["blocks.0.shortcut.weight"].shape) == (32, 16, 1, 1)
    assert (len(w), sum(v.numel() for v in w.values())) == (47, 304_641)
    assert [k for k in p if "shortcut" in k] == [f"layers.{i}.shortcut.weight" for i in (2, 4, 6)]
    assert (len(p), sum(v.numel() for v in p.values())) == (107, 11_179_995)


def test_normalization_is_inside_the_model():
    m = create("ibp-small", 10, (1, 28, 28), mean=[0.5], std=[0.25]).eval()
    x = torch.rand(3, 1, 28, 28)
    assert torch.allclose(m(x), m.net((x - 0.5) / 0.25), atol=1e-6)
    assert list(m.state_dict())[:2] == ["normalize.mean", "normalize.std"]


def test_unknown_arch_lists_names():
    with pytest.raises(KeyError, match="valid models: built-in .*ibp-small"):
        create("no_such_net_xyz", 10, (1, 28, 28))
    with pytest.raises(KeyError, match="tv:NAME"):
        create("tv:not_a_tv_model", 10)


def test_bad_checkpoints(tmp_path):
    m = create("ibp-small", 10, (1, 28, 28))
    save(m, tmp_path / "a")
    (tmp_path / "a" / "model.safetensors").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="model.safetensors.*corrupt"):
        load(tmp_path / "a")
    save(m, tmp_path / "b")
    spec = json.loads((tmp_path / "b" / "model.json").read_text())
    spec["arch"] = "ibp-medium"
    (tmp_path / "b" / "model.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="does not match model 'ibp-medium'"):
        load(tmp_path / "b")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "model.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load(tmp_path / "c")
    with pytest.raises(CheckpointError, match="not found"):
        load(tmp_path / "missing")


def test_plain_state_dict_weights_only(tmp_path):
    torch.manual_seed(0)
    m = create("ibp-small", 10, (1, 28, 28)).eval()
    torch.save({"state_dict": {"module." + k: v for k, v in m.net.state_dict().items()}}, tmp_path / "w.pt")
    m2 = from_pretrained_file(tmp_path / "w.pt", "ibp-small", 10, (1, 28, 28)).eval()
    x = torch.rand(2, 1, 28, 28)
    assert torch.equal(m(x), m2(x))

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="weights-only"):
        from_pretrained_file(tmp_path / "evil.pt", "ibp-small", 10, (1, 28, 28))
    with pytest.raises(CheckpointError, match="does not match model 'lenet'"):
        from_pretrained_file(tmp_path / "w.pt", "lenet", 10, (1, 28, 28))


def test_mnist5k_offline_shapes_range_balance():
    tr, te = load_data("mnist5k", "train"), load_data("mnist5k", "test")
    assert len(tr) == 4000 and len(te) == 1000
    assert tr.images.shape == (4000, 1, 28, 28) and tr.images.dtype == torch.uint8
    assert torch.bincount(tr.labels).tolist() == [400] * 10
    assert torch.bincount(te.labels).tolist() == [100] * 10
    x, y = next(iter(make_loader("mnist5k", "test", batch_size=64)))
    assert x.shape == (64, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.long
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.9
    # the split is fixed: same images every time, disjoint train/test
    assert torch.equal(load_data("mnist5k", "test").images, te.images)
    tr_set = {bytes(t.numpy()) for t in tr.images[:500]}
    assert not any(bytes(t.numpy()) in tr_set for t in te.images)


def test_loader_deterministic_and_sharded():
    a = make_loader("mnist5k", "train", batch_size=100, seed=3)
    b = make_loader("mnist5k", "train", batch_size=100, seed=3)
    a.set_epoch(2)
    b.set_epoch(2)
    assert torch.equal(next(iter(a))[1], next(iter(b))[1])
    b.set_epoch(3)
    assert not torch.equal(next(iter(a))[1], next(iter(b))[1])
    r0 = make_loader("mnist5k", "test", batch_size=1000, rank=0, world_size=2)
    r1 = make_loader("mnist5k", "test", batch_size=1000, rank=1, world_size=2)
    assert len(next(iter(r0))[1]) + len(next(iter(r1))[1]) == 1000


def test_crop_flip_shapes():
    x = torch.rand(8, 3, 32, 32)
    out = crop_flip(x, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and out.min() >= 0 and out.max() <= 1


def test_missing_dataset_message(tmp_path):
    with pytest.raises(DatasetError, match=r"not found under .*--download.*mnist5k"):
        load_data("cifar10", "test", data_root=str(tmp_path))
    with pytest.raises(KeyError, match="valid datasets: .*mnist5k"):
        load_data("imagenet-nope")
    assert dataset_info("cifar100").num_classes == 100


def test_imagefolder(tmp_path):
    from PIL import Image

    for split in ("train", "test"):
        for c in ("cat", "dog"):
            (tmp_path / split / c).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (8, 8), color=(i * 40, 0, 0)).save(tmp_path / split / c / f"{i}.png")
    d = load_data(f"imagefolder:{tmp_path}", "train")
    assert d.images.shape == (6, 3, 8, 8) and d.info.num_classes == 2


def test_crop_flip_offsets_differ_per_rank():
    """Under DDP the ranks' b-th batches get their own augmentation draws (one process: unchanged).
    Every image is the same digit, so equal draws would give equal batches."""
    from robustkit.data import Data, TensorLoader, load_data

    base = load_data("mnist5k", "train")
    same = Data(base.info, base.images[:1].repeat(64, 1, 1, 1), base.labels[:1].repeat(64))
    x0, x1 = (next(iter(TensorLoader(same, batch_size=16, augment="crop-flip", seed=3, rank=r, world_size=2)))[0]
              for r in (0, 1))
    assert not torch.equal(x0, x1)
    a, b = (next(iter(TensorLoader(same, batch_size=16, augment="crop-flip", seed=3)))[0] for _ in range(2))
    assert torch.equal(a, b)                                            # still deterministic
