"""Hub citizenship and safe loading: model cards, shards, Hub keywords, low-memory loading, offline failures,
weight checks, torn files (issues 11, 14, 15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.utils._python_dispatch import TorchDispatchMode

import dualvitok
from dualvitok import DualViTok, create_model
from dualvitok._weights import LoadingError, UnsafeCheckpointError
from dualvitok.assets import DEMO_MODEL_DIR

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def image():
    torch.manual_seed(1)
    return torch.rand(1, 3, 64, 64) * 2 - 1


@pytest.fixture
def saved(tiny_model, tmp_path):
    return tiny_model.save_pretrained(tmp_path / "m")


def _same_outputs(a, b, image) -> bool:
    with torch.no_grad():
        return torch.equal(a(image).reconstruction, b(image).reconstruction)


class _RandomInitCounter(TorchDispatchMode):
    """Counts elements written by random-init kernels on real (non-meta) tensors."""

    OPS = ("uniform_", "normal_", "kaiming_uniform_", "trunc_normal_", "random_", "bernoulli_")

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in self.OPS and torch.is_tensor(args[0]) and args[0].device.type != "meta":
            self.elements += args[0].numel()
        return func(*args, **(kwargs or {}))


# ------------------------------------------------------------------------------------------------ model card
def test_saved_model_card_has_metadata_architecture_and_evaluation(tiny_model, tmp_path):
    from huggingface_hub import ModelCard

    tiny_model.save_pretrained(tmp_path / "m", evaluation={"PSNR": 21.5, "SSIM": 0.61})
    card = ModelCard.load(tmp_path / "m" / "README.md")
    assert card.data.library_name == "dualvitok" and card.data.license == "apache-2.0"
    assert "image-tokenizer" in card.data.tags
    params = sum(p.numel() for p in tiny_model.parameters())
    assert "`dualvitok_tiny`" in card.text and f"{params:,}" in card.text
    assert "| PSNR | 21.5 |" in card.text and "| SSIM | 0.61 |" in card.text


def test_card_of_a_converted_reference_checkpoint_says_so(tiny_model, tmp_path):
    from huggingface_hub import ModelCard

    from dualvitok.convert import to_reference_state_dict

    folder = tmp_path / "ref"
    folder.mkdir()
    save_file(to_reference_state_dict(tiny_model.state_dict()), folder / "reference_state_dict.safetensors")
    config = tiny_model.config.to_dict()
    config.pop("config_version")
    (folder / "reference_config.json").write_text(json.dumps({"vq_model": config}))
    DualViTok.from_pretrained(folder).save_pretrained(tmp_path / "out")
    text = ModelCard.load(tmp_path / "out" / "README.md").text
    assert "Converted from the ILLUME+ reference checkpoint" in text


def test_demo_card_has_front_matter_and_the_export_keeps_a_hand_written_card(tiny_model, tmp_path):
    from huggingface_hub import ModelCard

    from dualvitok.training.demo import export_demo_model

    card = ModelCard.load(DEMO_MODEL_DIR / "README.md")
    assert card.data.library_name == "dualvitok" and card.data.license == "apache-2.0"
    assert {r.metric_type for r in card.data.eval_results} == {"psnr", "ssim"}
    resaved = DualViTok.from_pretrained("dualvitok-demo").save_pretrained(tmp_path / "again")
    assert "Loaded from" in ModelCard.load(resaved / "README.md").text  # a generated card says where it came from
    tiny_model.save_pretrained(tmp_path / "run" / "final")
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "README.md").write_text(str(card))
    export_demo_model(tmp_path / "run", tmp_path / "export")
    assert ModelCard.load(tmp_path / "export" / "README.md").text == card.text


# ------------------------------------------------------------------------------------------------ shards
def test_sharded_save_and_load(tiny_model, tmp_path, image):
    out = tiny_model.save_pretrained(tmp_path / "m", max_shard_size="2MB")
    names = sorted(p.name for p in out.iterdir())
    shards = [n for n in names if n.startswith("model-") and n.endswith(".safetensors")]
    assert "model.safetensors" not in names and "model.safetensors.index.json" in names and len(shards) >= 4
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(tiny_model.state_dict()) and set(index["weight_map"].values()) == set(shards)
    assert all((out / s).stat().st_size <= 2_000_000 + 1_000_000 for s in shards)  # a shard may exceed by one tensor
    loaded = DualViTok.from_pretrained(out)
    assert _same_outputs(loaded, tiny_model, image)
    tiny_model.save_pretrained(out)  # unsharded again: the old shards and index go
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]


def test_missing_shard_is_named(tiny_model, tmp_path):
    out = tiny_model.save_pretrained(tmp_path / "m", max_shard_size="2MB")
    victim = sorted(out.glob("model-*.safetensors"))[1]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        DualViTok.from_pretrained(out)


# ------------------------------------------------------------------------------------------------ low memory
def test_loading_never_random_initialises_the_parameters(saved):
    params = sum(p.numel() for p in create_model("dualvitok_tiny").parameters())
    with _RandomInitCounter() as building:  # the reference: building a model initialises every weight
        create_model("dualvitok_tiny")
    assert building.elements >= params
    with _RandomInitCounter() as loading:
        model = DualViTok.from_pretrained(saved)
    # only the small persistent codebook buffers are built for real (then replaced); no parameter is
    assert loading.elements <= sum(b.numel() for b in model.buffers()) < params / 100
    assert not any(p.is_meta for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())


def test_loaded_parameters_are_the_file_tensors_not_copies(saved):
    model = DualViTok.from_pretrained(saved)
    weights = load_file(saved / "model.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in weights.items())
    frozen = dict(model.named_parameters())["semantic_encoder.model.blocks.0.attn.qkv.weight"]
    assert not frozen.requires_grad  # the frozen tower stays frozen after assignment
    assert dict(model.named_parameters())["pixel_quant_conv.weight"].requires_grad


def test_missing_config_rejects_tiny_weights_without_building_the_released_model(saved):
    (saved / "config.json").unlink()
    with _RandomInitCounter() as counter, pytest.raises(LoadingError, match="no DualViTok config.json"):
        DualViTok.from_pretrained(saved)
    assert counter.elements < 10_000_000  # the released model has 1.35 B parameters


# ------------------------------------------------------------------------------------------------ keywords
def test_hub_keywords_are_passed_and_only_listed_files_are_fetched(saved, monkeypatch):
    import huggingface_hub

    requested = []

    def model_info(self, repo_id, revision=None, **kwargs):
        requested.append(("info", repo_id, revision))
        names = ["sub/config.json", "sub/model.safetensors", "other.txt"]
        return types.SimpleNamespace(sha="a" * 40, siblings=[types.SimpleNamespace(rfilename=n) for n in names])

    def hf_hub_download(repo_id, filename, **kwargs):
        requested.append(("get", filename, kwargs["revision"], kwargs["cache_dir"], kwargs["force_download"],
                          kwargs["token"]))
        return str(saved / filename.split("/")[-1])

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    model = DualViTok.from_pretrained("owner/name", revision="v1", subfolder="sub", cache_dir="C",
                                      force_download=True, token="T")
    assert isinstance(model, DualViTok)
    assert requested == [("info", "owner/name", "v1"),
                         ("get", "sub/config.json", "a" * 40, "C", True, "T"),
                         ("get", "sub/model.safetensors", "a" * 40, "C", True, "T")]


def test_dtype_keyword_and_deprecated_alias(saved):
    model = DualViTok.from_pretrained(saved, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    with pytest.warns(DeprecationWarning, match="dtype"):
        old = DualViTok.from_pretrained(saved, torch_dtype=torch.bfloat16)
    assert {p.dtype for p in old.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match="disagree"), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        DualViTok.from_pretrained(saved, dtype=torch.float16, torch_dtype=torch.bfloat16)
    with pytest.warns(DeprecationWarning):
        assert create_model("dualvitok_tiny", torch_dtype=torch.float16).pixel_quant_conv.weight.dtype == torch.float16


def test_demo_model_by_name(image):
    a = DualViTok.from_pretrained("dualvitok-demo")
    b = dualvitok.load_demo()
    c = DualViTok.from_pretrained(DEMO_MODEL_DIR)
    assert _same_outputs(a, c, image) and _same_outputs(b, c, image)
    assert a.pixel_quant_conv.weight.dtype == torch.float32  # stored in float16, loaded as float32


def test_create_model_pretrained_applies_or_refuses_overrides(tiny_model, tmp_path, monkeypatch):
    from dualvitok import registry
    from dualvitok.configuration import QuantizerConfig

    tiny_model.save_pretrained(tmp_path / "released")
    monkeypatch.setitem(registry.PRETRAINED, "dualvitok_tiny", str(tmp_path / "released"))
    model = create_model("dualvitok_tiny", pretrained=True, pixel_drop_rate=0.3)
    assert model.config.pixel_drop_rate == 0.3
    assert torch.equal(model.pixel_quant_conv.weight, tiny_model.pixel_quant_conv.weight)
    with pytest.raises(ValueError, match="change the weights' names or shapes"):
        create_model("dualvitok_tiny", pretrained=True, pixel_quantizer=QuantizerConfig(dim=8, codebook_size=1024))


# ------------------------------------------------------------------------------------------------ checks
@pytest.mark.parametrize("poison", ["nan", "inf"])
def test_non_finite_weights_are_refused_unless_opted_out(saved, poison):
    weights = load_file(saved / "model.safetensors")
    weights["pixel_quant_conv.weight"][0, 0] = float(poison)
    save_file(weights, saved / "model.safetensors")
    with pytest.raises(LoadingError, match="pixel_quant_conv.weight.*NaN or Inf"):
        DualViTok.from_pretrained(saved)
    model = DualViTok.from_pretrained(saved, check_weights=False)
    assert not torch.isfinite(model.pixel_quant_conv.weight).all()


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool] + ([torch.float8_e4m3fn]
                                                               if hasattr(torch, "float8_e4m3fn") else []))
def test_non_float_weights_are_refused(saved, dtype):
    weights = load_file(saved / "model.safetensors")
    weights["pixel_quant_conv.weight"] = weights["pixel_quant_conv.weight"].to(dtype)
    save_file(weights, saved / "model.safetensors")
    with pytest.raises(LoadingError, match=r"pixel_quant_conv.weight \(torch\.\w+\).*check_weights=False"):
        DualViTok.from_pretrained(saved)


def test_from_reference_checks_weights(tiny_model):
    from dualvitok.convert import to_reference_state_dict

    config = tiny_model.config.to_dict()
    config.pop("config_version")
    weights = to_reference_state_dict(tiny_model.state_dict())
    weights["pixel_quant_conv.bias"] = torch.full_like(weights["pixel_quant_conv.bias"], float("nan"))
    with pytest.raises(LoadingError, match="pixel_quant_conv.bias"):
        DualViTok.from_reference(config, weights)


# ------------------------------------------------------------------------------------------------ torn files
def test_truncated_weights_name_the_file(saved):
    path = saved / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(LoadingError, match=r"model\.safetensors.*truncated"):
        DualViTok.from_pretrained(saved)
    path.write_bytes(data[:100])  # torn inside the header
    with pytest.raises(LoadingError, match=r"model\.safetensors"):
        DualViTok.from_pretrained(saved)


@pytest.mark.parametrize("content", ["[1, 2, 3]", "{not json", ""])
def test_bad_config_file_is_named(saved, content):
    (saved / "config.json").write_text(content)
    with pytest.raises(LoadingError, match="config.json"):
        DualViTok.from_pretrained(saved)


def test_refused_pickle_gives_a_clear_error(tmp_path):
    from dualvitok.training.checkpoint import load_checkpoint

    class Evil:
        def __reduce__(self):
            return (os.getcwd, ())

    torch.save({"model": Evil()}, tmp_path / "evil.pt")
    for load in (load_checkpoint, dualvitok.convert.load_weights):
        with pytest.raises(UnsafeCheckpointError, match=r"refused to load .*evil\.pt.*never runs pickled code"):
            load(tmp_path / "evil.pt")


# ------------------------------------------------------------------------------------------------ offline
def test_unreachable_hub_asks_once_then_uses_the_cache(monkeypatch, tmp_path):
    import huggingface_hub

    calls = {"info": 0, "download": 0}

    def model_info(self, *args, **kwargs):
        calls["info"] += 1
        raise ConnectionRefusedError("[Errno 111] Connection refused")

    def hf_hub_download(*args, **kwargs):
        calls["download"] += 1
        raise AssertionError("no download may be tried once the Hub is known to be unreachable")

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    with pytest.raises(OSError, match=r"cannot be reached.*`hf download owner/absent --local-dir DIR`"):
        DualViTok.from_pretrained("owner/absent", cache_dir=str(tmp_path / "cache"))
    assert calls == {"info": 1, "download": 0}


def test_closed_endpoint_fails_fast_in_a_fresh_process(tmp_path):
    """Against a closed local port the load fails with the library's message after one request (it used to retry
    every candidate file name for ~190 s); the timeout only guards against a hang."""
    env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="0", HF_HOME=str(tmp_path / "hf"),
               PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = ("from dualvitok import DualViTok\n"
            "try:\n    DualViTok.from_pretrained('owner/absent-model')\n"
            "except OSError as e:\n    print('ERROR', e)\n")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert "ERROR could not load" in result.stdout and "hf download owner/absent-model --local-dir DIR" in result.stdout
    assert "Retrying" not in result.stderr


def test_every_offline_message_names_the_current_cli():
    sources = [p for p in (REPO_ROOT / "dualvitok").rglob("*.py")]
    offenders = [str(p.relative_to(REPO_ROOT)) for p in sources if "huggingface-cli" in p.read_text(encoding="utf-8")]
    assert offenders == []


def test_offline_folder_resolver_message(monkeypatch, tmp_path):
    from dualvitok._hubfiles import snapshot_folder

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(OSError, match="hf download owner/refiner --local-dir DIR"):
        snapshot_folder("owner/refiner", what="the refiner", cache_dir=str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        snapshot_folder(str(tmp_path / "nope"))


def test_offline_load_from_the_hub_cache_and_subfolders(saved, tmp_path, image):
    """Offline (local_files_only or HF_HUB_OFFLINE) a cached repo loads from the cache without any request."""
    import shutil

    sha = "b" * 40
    repo = tmp_path / "cache" / "models--owner--cached"
    snapshot = repo / "snapshots" / sha / "tok"
    shutil.copytree(saved, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    reference = DualViTok.from_pretrained(saved)
    model = DualViTok.from_pretrained("owner/cached", subfolder="tok", cache_dir=tmp_path / "cache",
                                      local_files_only=True)
    assert _same_outputs(model, reference, image)
    local = DualViTok.from_pretrained(snapshot.parent, subfolder="tok")
    assert _same_outputs(local, reference, image)
    with pytest.raises(OSError, match=r"local_files_only=True \(tok/config.json"):
        DualViTok.from_pretrained("owner/cached", subfolder="tok", revision="v2", cache_dir=tmp_path / "cache",
                                  local_files_only=True)


def test_unknown_model_names_are_refused_without_asking_the_hub(monkeypatch):
    from dualvitok.loading import load_model

    def no_hub(*args, **kwargs):  # pragma: no cover - must not be reached
        raise AssertionError("asked the Hub for a name that cannot be a repo id")

    monkeypatch.setattr("huggingface_hub.HfApi.model_info", no_hub)
    with pytest.raises(FileNotFoundError, match=r"unknown model 'nonexistent'.*dualvitok_tiny.*'demo'"):
        load_model("nonexistent")


def test_tiny_is_the_tiny_architecture(caplog):
    from dualvitok.loading import load_model

    model = load_model("tiny")
    assert model.config == load_model("dualvitok_tiny").config
    assert "RANDOM weights" in caplog.text
