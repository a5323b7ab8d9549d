"""Checkpoints: round trips, corruption detection, atomic writes, model files."""

import hashlib
import json

import pytest
import torch
from torch import nn

import optidiff as od
from optidiff import checkpoint as ckpt
from optidiff.models import registry
from optidiff.models.registry import model_from_config, model_to_config, register_model


@pytest.fixture
def saved(tmp_path):
    tensors = {"a": torch.randn(3, 4), "b": torch.arange(5, dtype=torch.int64),
               "c": torch.tensor(2.5, dtype=torch.float64),
               "g": torch.Generator().manual_seed(3).get_state(),
               "strided": torch.randn(4, 6)[:, ::2]}
    meta = {"step": 7, "nested": {"x": [1, 2.5, None, "s"]}}
    path = ckpt.save_checkpoint(tmp_path / "ck", tensors, meta)
    return path, tensors, meta


def _tensor_file(path):
    (f,) = path.glob("tensors-*.safetensors")
    return f


def test_round_trip_is_exact(saved):
    path, tensors, meta = saved
    loaded, loaded_meta = ckpt.load_checkpoint(path)
    assert loaded_meta == meta
    assert set(loaded) == set(tensors)
    for k, v in tensors.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k


def test_overwrite_keeps_one_tensor_file_and_no_temp_files(saved):
    path, tensors, _ = saved
    ckpt.save_checkpoint(path, {"a": tensors["a"] + 1}, {"step": 8})
    names = sorted(p.name for p in path.iterdir())
    assert len(names) == 2 and names[0] == "meta.json" and names[1].endswith(".safetensors")
    loaded, meta = ckpt.load_checkpoint(path)
    assert meta == {"step": 8} and torch.equal(loaded["a"], tensors["a"] + 1)


def test_crash_before_commit_keeps_the_old_checkpoint(saved, monkeypatch):
    path, tensors, meta = saved
    real_replace = ckpt.os.replace

    def replace(src, dst):
        if str(dst).endswith("meta.json"):
            raise OSError("simulated crash")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", replace)
    with pytest.raises(OSError, match="simulated crash"):
        ckpt.save_checkpoint(path, {"a": torch.zeros(1)}, {"step": 99})
    monkeypatch.undo()
    assert not list(path.glob("*.tmp")) and not list(path.glob(".*"))
    loaded, loaded_meta = ckpt.load_checkpoint(path)
    assert loaded_meta == meta and torch.equal(loaded["a"], tensors["a"])
    ckpt.save_checkpoint(path, {"a": torch.zeros(1)}, {"step": 100})  # orphan file cleaned up
    assert len(list(path.glob("tensors-*.safetensors"))) == 1


def test_modified_tensor_file_is_detected(saved):
    path, _, _ = saved
    f = _tensor_file(path)
    blob = bytearray(f.read_bytes())
    blob[-3] ^= 0xFF
    f.write_bytes(bytes(blob))
    with pytest.raises(ckpt.CheckpointError, match=r"corrupted checkpoint .*SHA-256"):
        ckpt.load_checkpoint(path)


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_bad_safetensors_is_a_checkpoint_error(saved, damage):
    """Garbage or truncated bytes whose digest matches meta.json: safetensors rejects them."""
    path, _, _ = saved
    f = _tensor_file(path)
    blob = b"\x13\x37garbage" * 50 if damage == "garbage" else f.read_bytes()[:60]
    f.write_bytes(blob)
    record = json.loads((path / "meta.json").read_text())
    record["sha256"] = hashlib.sha256(blob).hexdigest()
    (path / "meta.json").write_text(json.dumps(record))
    with pytest.raises(ckpt.CheckpointError, match=f"corrupted checkpoint '.*{f.name}'"):
        ckpt.load_checkpoint(path)


def test_truncated_tensor_file(saved):
    path, _, _ = saved
    f = _tensor_file(path)
    f.write_bytes(f.read_bytes()[:100])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.load_checkpoint(path)


def test_missing_or_bad_json(saved, tmp_path):
    path, _, _ = saved
    with pytest.raises(ckpt.CheckpointError, match="no checkpoint at .*nowhere.*meta.json"):
        ckpt.load_checkpoint(tmp_path / "nowhere")
    meta = path / "meta.json"
    text = meta.read_text()
    meta.write_text(text[: len(text) // 2])
    with pytest.raises(ckpt.CheckpointError, match="invalid JSON"):
        ckpt.load_checkpoint(path)
    record = json.loads(text)
    meta.write_text(json.dumps({**record, "version": 99}))
    with pytest.raises(ckpt.CheckpointError, match="format version 99"):
        ckpt.load_checkpoint(path)
    meta.write_text(json.dumps({k: v for k, v in record.items() if k != "sha256"}))
    with pytest.raises(ckpt.CheckpointError, match=r"missing keys \['sha256'\]"):
        ckpt.load_checkpoint(path)
    meta.write_text(json.dumps([1, 2]))
    with pytest.raises(ckpt.CheckpointError, match="not an optidiff checkpoint"):
        ckpt.load_checkpoint(path)
    meta.unlink()
    with pytest.raises(ckpt.CheckpointError, match="meta.json is missing"):
        ckpt.load_checkpoint(path)


def test_missing_tensor_file(saved):
    path, _, _ = saved
    _tensor_file(path).unlink()
    with pytest.raises(ckpt.CheckpointError, match="tensor file .* is missing"):
        ckpt.load_checkpoint(path)


def test_bad_save_arguments(tmp_path):
    with pytest.raises(ValueError, match="meta must be JSON"):
        ckpt.save_checkpoint(tmp_path / "a", {}, {"x": object()})
    with pytest.raises(ValueError, match="meta must be JSON"):
        ckpt.save_checkpoint(tmp_path / "a", {}, {"x": float("nan")})
    with pytest.raises(ValueError, match="tensors must map str to Tensor"):
        ckpt.save_checkpoint(tmp_path / "a", {"x": [1.0]}, {})
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="path must be a directory"):
        ckpt.save_checkpoint(tmp_path / "file", {}, {})
    with pytest.raises(ckpt.CheckpointError, match="no tensors under 'ema.'"):
        ckpt.unpack({"model.w": torch.zeros(1)}, "ema.")


def test_optimizer_and_generator_state_round_trip(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.SiLU(), nn.Linear(4, 1))
    opt = torch.optim.AdamW(net.parameters(), lr=3e-3, betas=(0.8, 0.95), weight_decay=0.1)
    for _ in range(3):
        opt.zero_grad()
        net(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
    gen = torch.Generator().manual_seed(5)
    torch.randn(10, generator=gen)
    ckpt.save_state(tmp_path / "c", {"optim": opt.state_dict(), "rng": gen.get_state()})
    state, _ = ckpt.load_state(tmp_path / "c")
    loaded = {"rng": state["rng"]}

    opt2 = torch.optim.AdamW(net.parameters(), lr=1.0)
    opt2.load_state_dict(state["optim"])
    a, b = opt.state_dict(), opt2.state_dict()
    assert a["param_groups"] == b["param_groups"]  # betas back to a tuple
    for i in a["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(a["state"][i][name], b["state"][i][name])
    gen2 = torch.Generator()
    ckpt.set_generator_state(gen2, loaded["rng"])
    assert torch.equal(torch.randn(5, generator=gen), torch.randn(5, generator=gen2))
    with pytest.raises(ckpt.CheckpointError, match="generator state"):
        ckpt.set_generator_state(gen2, torch.zeros(3, dtype=torch.uint8))


def test_save_model_load_model_round_trip(tmp_path):
    torch.manual_seed(1)
    model = od.models.TimeMLP(3, hidden=16, depth=2, emb_dim=8, num_classes=4)
    od.save_model(tmp_path / "m", model)
    loaded = od.load_model(tmp_path / "m")
    assert isinstance(loaded, od.models.TimeMLP) and loaded.config == model.config
    x, sigma, labels = torch.randn(5, 3), torch.rand(5) + 0.1, torch.tensor([0, 1, 2, 3, -1])
    assert torch.equal(loaded(x, sigma, labels), model(x, sigma, labels))
    with pytest.raises(ValueError, match="holds no EMA"):
        od.load_model(tmp_path / "m", ema=True)


def test_model_registry(monkeypatch):
    monkeypatch.setattr(registry, "_MODELS", dict(registry._MODELS))  # keep the registry clean

    class Plain(nn.Linear):
        pass

    with pytest.raises(ValueError, match="Plain' is not registered"):
        model_to_config(Plain(2, 2))
    with pytest.raises(ckpt.CheckpointError, match="registered model class"):
        model_from_config({"class": "Nope"})

    @register_model
    class Scaled(nn.Module):
        def __init__(self, dim: int, scale: float = 1.0, sizes: tuple[int, ...] = (1, 2)):
            super().__init__()
            self.w = nn.Parameter(torch.full((dim,), scale))

    @register_model
    class Scaled2(Scaled):  # a registered subclass records its own call
        def __init__(self, dim: int):
            super().__init__(dim, scale=3.0)

    m = Scaled(3, scale=2.0)
    assert m.config == {"dim": 3, "scale": 2.0, "sizes": [1, 2]}  # defaults filled, JSON types
    clone = model_from_config(model_to_config(m))
    assert isinstance(clone, Scaled) and torch.equal(clone.w, torch.full((3,), 2.0))
    assert Scaled2(4).config == {"dim": 4}
    name = model_to_config(m)["class"]  # a class outside optidiff is named by its import path
    assert name == "test_checkpoint:test_model_registry.<locals>.Scaled"
    with pytest.raises(ckpt.CheckpointError, match="cannot build .*Scaled"):
        model_from_config({"class": name, "config": {"dim": 3, "width": 9}})


def test_load_model_names_the_checkpoint_when_json_and_tensors_disagree(tmp_path):
    model = od.models.TimeMLP(3, hidden=16, depth=2, emb_dim=8)
    path = od.save_model(tmp_path / "m", model)
    meta_file = path / "meta.json"
    record = json.loads(meta_file.read_text())

    def rewrite(model_record):
        record["meta"]["model"] = model_record
        meta_file.write_text(json.dumps(record))

    rewrite({"class": "TimeMLP", "config": {**model.config, "hidden": 32}})  # size mismatch
    with pytest.raises(ckpt.CheckpointError, match="weights do not fit TimeMLP"):
        od.load_model(path)
    rewrite({"class": "TimeMLP", "config": {**model.config, "colour": 1}})  # unknown key
    with pytest.raises(ckpt.CheckpointError, match="cannot build TimeMLP.*colour"):
        od.load_model(path)
    rewrite({"class": "TimeMLP", "config": [1, 2]})  # malformed
    with pytest.raises(ckpt.CheckpointError, match="'config' must be a JSON object"):
        od.load_model(path)
    record["meta"] = "not an object"
    meta_file.write_text(json.dumps(record))
    with pytest.raises(ckpt.CheckpointError, match="not a JSON object"):
        od.load_model(path)


def test_killed_writes_leave_no_temporaries_after_the_next_save(tmp_path):
    path = tmp_path / "c"
    ckpt.save_checkpoint(path, {"w": torch.zeros(3)}, {})
    # what a save killed between the temporary write and the rename leaves behind
    (path / ".tensors-0123456789abcdef.safetensors.abc.tmp").write_bytes(b"x" * 100)
    (path / ".meta.json.xyz.tmp").write_text("{")
    ckpt.save_checkpoint(path, {"w": torch.ones(3)}, {})
    assert sorted(p.name for p in path.iterdir() if p.name.endswith(".tmp")) == []
    assert torch.equal(ckpt.load_checkpoint(path)[0]["w"], torch.ones(3))
    f = tmp_path / "samples.safetensors"
    (tmp_path / ".samples.safetensors.q.tmp").write_bytes(b"x")
    ckpt.save_tensors(f, {"samples": torch.zeros(2)})
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*.tmp"))


def test_read_jsonl_drops_a_half_written_last_line_and_names_a_bad_one(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"round": 0}\n{"round": 1}\n{"rou')
    assert ckpt.read_jsonl(f) == [{"round": 0}, {"round": 1}]
    f.write_text('{"round": 0}\nnot json\n{"round": 2}\n')
    with pytest.raises(ckpt.CheckpointError, match=r"metrics.jsonl:2: not a JSON line"):
        ckpt.read_jsonl(f)
    f.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(ckpt.CheckpointError, match="not UTF-8"):
        ckpt.read_jsonl(f)
