"""Checkpoint loading and saving: formats, key names, and clear errors for broken checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from eomt_fast import CheckpointError, ConfigError, EomtFastForUniversalSegmentation
from eomt_fast.testing import TEST_CONFIGS, random_hf_model

pytest.importorskip("transformers")


@pytest.fixture
def saved(tmp_path):
    """A random transformers model (masking mixed) saved in the transformers format, and the model."""
    hf = random_hf_model(seed=1, dtype=torch.float64, attn_mask_probs=[1.0, 0.0], **TEST_CONFIGS["small_r4"])
    hf.save_pretrained(tmp_path)
    return tmp_path, hf


def outputs_of(model, seed=0, dtype=torch.float64):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return model(x)


def assert_same_model(a, b):
    for name in ("masks_queries_logits", "class_queries_logits", "last_hidden_state"):
        torch.testing.assert_close(getattr(outputs_of(a), name), getattr(outputs_of(b), name), rtol=1e-9, atol=1e-12)


def test_attn_mask_probs_come_from_the_checkpoint(saved):
    path, _ = saved
    model = EomtFastForUniversalSegmentation.from_pretrained(path)
    assert model.masking_probs() == (1.0, 0.0)


def test_attn_mask_probs_default_to_ones_when_absent(saved):
    path, _ = saved
    state = load_file(path / "model.safetensors")
    del state["attn_mask_probs"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    assert EomtFastForUniversalSegmentation.from_pretrained(path).masking_probs() == (1.0, 1.0)


def test_sharded_safetensors(saved, tmp_path_factory):
    path, _ = saved
    state = load_file(path / "model.safetensors")
    keys = sorted(state)
    sharded = tmp_path_factory.mktemp("sharded")
    (sharded / "config.json").write_text((path / "config.json").read_text())
    weight_map = {}
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, sharded / name, metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert_same_model(EomtFastForUniversalSegmentation.from_pretrained(sharded),
                      EomtFastForUniversalSegmentation.from_pretrained(path))


def test_pytorch_bin(saved, tmp_path_factory):
    path, _ = saved
    other = tmp_path_factory.mktemp("bin")
    (other / "config.json").write_text((path / "config.json").read_text())
    torch.save(load_file(path / "model.safetensors"), other / "pytorch_model.bin")
    assert_same_model(EomtFastForUniversalSegmentation.from_pretrained(other),
                      EomtFastForUniversalSegmentation.from_pretrained(path))


def test_swiglu_with_transformers_4_key_names(tmp_path):
    """transformers 4.x stored SwiGLU as mlp.weights_in (gate rows, then up rows) and mlp.weights_out."""
    hf = random_hf_model(seed=2, dtype=torch.float64, attn_mask_probs=[1.0, 0.0, 1.0], **TEST_CONFIGS["r0_swiglu"])
    hf.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    old = {}
    for key, tensor in state.items():
        if ".mlp.gate_proj." in key:
            up = state[key.replace("gate_proj", "up_proj")]
            old[key.replace("gate_proj", "weights_in")] = torch.cat([tensor, up])
        elif ".mlp.up_proj." in key:
            continue
        else:
            old[key.replace("down_proj", "weights_out")] = tensor
    assert any("weights_in" in k for k in old) and not any("gate_proj" in k for k in old)
    save_file(old, tmp_path / "model.safetensors", metadata={"format": "pt"})
    ours = EomtFastForUniversalSegmentation.from_pretrained(tmp_path)
    x = torch.randn(2, 3, 48, 48, dtype=torch.float64)
    torch.testing.assert_close(ours(x).masks_queries_logits, hf(x).masks_queries_logits, rtol=1e-9, atol=1e-10)


def test_save_pretrained_round_trips_through_transformers(saved, tmp_path_factory):
    from transformers import EomtForUniversalSegmentation

    path, hf = saved
    ours = EomtFastForUniversalSegmentation.from_pretrained(path)
    out_dir = tmp_path_factory.mktemp("saved")
    ours.save_pretrained(out_dir)
    state = load_file(out_dir / "model.safetensors")
    assert set(state) == set(load_file(path / "model.safetensors"))  # same keys, loss buffer included
    back = EomtForUniversalSegmentation.from_pretrained(out_dir).eval()
    back.set_attn_implementation(hf.config._attn_implementation)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    torch.testing.assert_close(back(x).masks_queries_logits, hf(x).masks_queries_logits, rtol=1e-9, atol=1e-10)
    assert back.config.id2label == hf.config.id2label
    assert torch.equal(back.attn_mask_probs, hf.attn_mask_probs)
    assert_same_model(EomtFastForUniversalSegmentation.from_pretrained(out_dir), ours)


@pytest.mark.parametrize("dtype", ["bfloat16", torch.float16, torch.float32])
def test_dtype_and_device_arguments(saved, dtype):
    path, _ = saved
    model = EomtFastForUniversalSegmentation.from_pretrained(path, device="cpu", dtype=dtype)
    expected = dtype if isinstance(dtype, torch.dtype) else torch.bfloat16
    assert model.dtype == expected and model.device == torch.device("cpu")
    assert all(p.dtype == expected for p in model.parameters())


def test_bad_dtype_argument(saved):
    with pytest.raises(ValueError, match="dtype"):
        EomtFastForUniversalSegmentation.from_pretrained(saved[0], dtype="int8")


# ---- broken checkpoints: one clear error that names the file or the keys ---------------------------
def test_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        EomtFastForUniversalSegmentation.from_pretrained(tmp_path / "nope")


def test_file_instead_of_directory(saved):
    with pytest.raises(NotADirectoryError, match="config.json"):
        EomtFastForUniversalSegmentation.from_pretrained(saved[0] / "config.json")


def test_missing_config(saved):
    (saved[0] / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json"):
        EomtFastForUniversalSegmentation.from_pretrained(saved[0])


def test_missing_weights(saved):
    (saved[0] / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        EomtFastForUniversalSegmentation.from_pretrained(saved[0])


def test_truncated_weights(saved):
    weights = saved[0] / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        EomtFastForUniversalSegmentation.from_pretrained(saved[0])


def test_truncated_pytorch_bin(saved):
    state = load_file(saved[0] / "model.safetensors")
    (saved[0] / "model.safetensors").unlink()
    torch.save(state, saved[0] / "pytorch_model.bin")
    data = (saved[0] / "pytorch_model.bin").read_bytes()
    (saved[0] / "pytorch_model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="pytorch_model.bin"):
        EomtFastForUniversalSegmentation.from_pretrained(saved[0])


def test_config_that_is_not_eomt(saved):
    config = json.loads((saved[0] / "config.json").read_text())
    config["model_type"] = "vit"
    (saved[0] / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"config\.json.*not an EoMT config"):
        EomtFastForUniversalSegmentation.from_pretrained(saved[0])


def test_config_that_is_not_json(saved):
    (saved[0] / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="config.json"):
        EomtFastForUniversalSegmentation.from_pretrained(saved[0])


def test_missing_unexpected_and_misshaped_keys_are_listed(saved):
    path = saved[0]
    state = load_file(path / "model.safetensors")
    del state["layers.1.attention.q_proj.weight"]
    state["layers.9.extra.weight"] = torch.zeros(3)
    state["query.weight"] = torch.zeros(3, 64)
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        EomtFastForUniversalSegmentation.from_pretrained(path)
    message = str(info.value)
    assert "missing keys: layers.1.attention.q_proj.weight" in message
    assert "unexpected keys: layers.9.extra.weight" in message
    assert "query.weight (3, 64) (expected (7, 64))" in message


def test_loss_buffer_is_ignored(saved):
    path = saved[0]
    state = load_file(path / "model.safetensors")
    assert "criterion.empty_weight" in state
    del state["criterion.empty_weight"]
    save_file(state, path / "model.safetensors", metadata={"format": "pt"})
    EomtFastForUniversalSegmentation.from_pretrained(path)  # neither missing when absent nor unexpected when present


def test_hub_id_without_network_fails_clearly(monkeypatch):
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="could not fetch 'tue-mps/no_such_eomt_model' from the Hugging Face Hub"):
        EomtFastForUniversalSegmentation.from_pretrained("tue-mps/no_such_eomt_model")


def test_hub_id_without_huggingface_hub(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_hub(name, *args, **kwargs):
        if name == "huggingface_hub":
            raise ImportError("no huggingface_hub")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_hub)
    with pytest.raises(FileNotFoundError, match=r"eomt-fast\[hf\]"):
        EomtFastForUniversalSegmentation.from_pretrained("tue-mps/coco_panoptic_eomt_large_640")


class FakeHub:
    """huggingface_hub.snapshot_download over a local "repository" folder: copies the files matching
    allow_patterns into one snapshot folder, as the real one fills its cache, and records each call."""

    def __init__(self, repo, snapshot):
        self.repo, self.snapshot, self.calls = repo, snapshot, []

    def __call__(self, repo_id, allow_patterns, **options):
        import fnmatch
        import shutil

        self.calls.append((repo_id, list(allow_patterns), options))
        self.snapshot.mkdir(exist_ok=True)
        for file in self.repo.iterdir():
            if any(fnmatch.fnmatch(file.name, pattern) for pattern in allow_patterns):
                shutil.copy(file, self.snapshot / file.name)
        return str(self.snapshot)


@pytest.fixture
def hub(saved, tmp_path_factory, monkeypatch):
    huggingface_hub = pytest.importorskip("huggingface_hub")
    path, hf = saved
    torch.save(hf.state_dict(), path / "pytorch_model.bin")  # a repository holding both formats,
    (path / "model.fp16.safetensors").write_bytes(b"not fetched")  # a variant nobody asked for
    (path / "preprocessor_config.json").write_text(json.dumps({"do_split_image": True, "do_pad": False}))
    fake = FakeHub(path, tmp_path_factory.mktemp("snapshot"))
    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    return fake, hf


def test_hub_fetches_one_weight_format_and_passes_the_options(hub):
    fake, hf = hub
    model = EomtFastForUniversalSegmentation.from_pretrained("org/eomt", revision="abc123", token="secret",
                                                              cache_dir="/tmp/cache")
    assert_same_model(model, EomtFastForUniversalSegmentation.from_hf(hf))
    assert len(fake.calls) == 1
    repo_id, patterns, options = fake.calls[0]
    assert repo_id == "org/eomt" and "pytorch_model.bin" not in patterns
    assert options == {"revision": "abc123", "token": "secret", "cache_dir": "/tmp/cache", "local_files_only": False}
    assert not (fake.snapshot / "pytorch_model.bin").exists()  # the safetensors were enough
    assert not (fake.snapshot / "model.fp16.safetensors").exists()


def test_hub_sharded_safetensors_fetch_exactly_the_indexed_shards(hub):
    fake, hf = hub
    (fake.repo / "model.safetensors").unlink()
    hf.save_pretrained(fake.repo, max_shard_size="100KB")
    (fake.repo / "model.safetensors").unlink(missing_ok=True)
    shards = sorted(set(json.loads((fake.repo / "model.safetensors.index.json").read_text())["weight_map"].values()))
    assert len(shards) > 1
    (fake.repo / "model-00099-of-00099.safetensors").write_bytes(b"a stray shard no index names")
    model = EomtFastForUniversalSegmentation.from_pretrained("org/eomt")
    assert_same_model(model, EomtFastForUniversalSegmentation.from_hf(hf))
    assert [patterns for _, patterns, _ in fake.calls][1] == shards
    assert fake.calls[1][2]["revision"] == fake.snapshot.name
    assert not (fake.snapshot / "model-00099-of-00099.safetensors").exists()


def test_hub_cache_offline_with_the_real_huggingface_hub(saved, tmp_path):
    """A Hub cache laid out as huggingface_hub lays it out (refs/main -> snapshots/<commit>), read by the real
    snapshot_download with local_files_only=True: no network, and the PyTorch-weights fetch pinned to <commit>."""
    pytest.importorskip("huggingface_hub")
    path, hf = saved
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "cache" / "models--org--eomt"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (snapshot / "config.json").write_text((path / "config.json").read_text())
    torch.save(hf.state_dict(), snapshot / "pytorch_model.bin")
    for revision in (None, "main", commit):
        model = EomtFastForUniversalSegmentation.from_pretrained(
            "org/eomt", cache_dir=tmp_path / "cache", local_files_only=True, revision=revision)
        assert_same_model(model, EomtFastForUniversalSegmentation.from_hf(hf))
    (snapshot / "pytorch_model.bin").unlink()
    (snapshot / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    model = EomtFastForUniversalSegmentation.from_pretrained("org/eomt", cache_dir=tmp_path / "cache",
                                                              local_files_only=True)
    assert_same_model(model, EomtFastForUniversalSegmentation.from_hf(hf))


def test_hub_errors_are_one_clear_message(hub, monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise ConnectionError("no route to host")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(OSError, match="could not fetch 'org/eomt' from the Hugging Face Hub .ConnectionError: no route"):
        EomtFastForUniversalSegmentation.from_pretrained("org/eomt")


def test_hub_falls_back_to_pytorch_weights_only_without_safetensors(hub):
    fake, hf = hub
    (fake.repo / "model.safetensors").unlink()
    model = EomtFastForUniversalSegmentation.from_pretrained("org/eomt", local_files_only=True)
    assert_same_model(model, EomtFastForUniversalSegmentation.from_hf(hf))
    assert [patterns for _, patterns, _ in fake.calls][1] == ["pytorch_model.bin"]
    assert all(options["local_files_only"] is True for _, _, options in fake.calls)
    assert fake.calls[1][2]["revision"] == fake.snapshot.name  # the same commit as the first fetch


def test_processor_from_the_hub_fetches_no_weights(hub):
    from eomt_fast import EomtFastImageProcessor

    fake, _ = hub
    proc = EomtFastImageProcessor.from_pretrained("org/eomt", revision="v1", do_pad=True)
    assert proc.do_split_image and proc.do_pad  # preprocessor_config.json, then the keyword override
    (_, patterns, options), = fake.calls
    assert patterns == ["config.json", "preprocessor_config.json"] and options["revision"] == "v1"
    assert sorted(p.name for p in fake.snapshot.iterdir()) == ["config.json", "preprocessor_config.json"]


def test_transformers_argument_names(saved):
    path, _ = saved
    load = EomtFastForUniversalSegmentation.from_pretrained
    model = load(path, torch_dtype="bf16", device_map="cpu")
    assert model.dtype == torch.bfloat16 and model.device.type == "cpu"
    assert load(path, dtype=torch.float32, torch_dtype="float32").dtype == torch.float32
    assert load(path, torch_dtype="auto").dtype == load(path, dtype="auto").dtype == torch.float64  # stored dtype
    for device, device_map in (("cpu", torch.device("cpu")), (torch.device("cpu"), "cpu"), (None, {"": "cpu"})):
        assert load(path, device=device, device_map=device_map).device.type == "cpu"
    with pytest.raises(ValueError, match="dtype=torch.float32 and torch_dtype=torch.bfloat16 disagree"):
        load(path, dtype=torch.float32, torch_dtype="bf16")
    with pytest.raises(ValueError, match="device=device.type='cpu'. and device_map='meta' disagree"):
        load(path, device="cpu", device_map="meta")
    for device_map in ("auto", "balanced", {"": 0, "layers.1": 1}, {"": "auto"}):
        with pytest.raises(ValueError, match=f"device_map={device_map!r}: EomtFastForUniversalSegmentation runs on one"
                                             .replace("{", "\\{").replace("}", "\\}")):
            load(path, device_map=device_map)
    for device_map, message in ((True, "is not a device"), (1.5, "is not a device"), ("gpu", "is not a device"),
                                (-1, "a GPU index must be >= 0"), ({"": -1}, "a GPU index must be >= 0")):
        with pytest.raises(ValueError, match=message):
            load(path, device_map=device_map)


@pytest.mark.parametrize(("device", "device_map", "expected"), [
    (None, 0, "cuda:0"), (None, {"": 1}, "cuda:1"), (None, "cuda", "cuda"),
    ("cuda:1", "cuda", "cuda:1"), ("cuda", 2, "cuda:2"), (0, "cuda:0", "cuda:0"), ("cpu", None, "cpu"),
])
def test_device_and_device_map_combine(device, device_map, expected):
    """The spelling with an index wins; no device is touched (nothing here needs CUDA)."""
    from eomt_fast.model import _load_device

    assert str(_load_device(device, device_map)) == expected


def test_device_and_device_map_disagreeing():
    from eomt_fast.model import _load_device

    for device, device_map in (("cuda:0", "cuda:1"), ("cpu", 0), ("cuda:1", {"": 0})):
        with pytest.raises(ValueError, match="disagree"):
            _load_device(device, device_map)


def test_unknown_hub_option():
    from eomt_fast.checkpoint import resolve_directory

    with pytest.raises(TypeError, match=r"unexpected keyword arguments \['proxies'\]"):
        resolve_directory("org/eomt", proxies={})
