"""Sweep specs: every shipped spec validates; every bad spec gets one line naming its field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rattention import metrics as M
from rattention.errors import ConfigError
from rattention.run_config import EvalConfig
from sweeps.spec import SweepSpec, check_cluster, load_spec

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "sweeps").glob("*.yaml"))
DEMO = ROOT / "sweeps" / "demo.yaml"


def _error(path: Path, overrides: list[str] | None = None) -> str:
    """The one-line ConfigError a spec gives (fails if it loads)."""
    with pytest.raises(ConfigError) as info:
        load_spec(path, overrides)
    msg = str(info.value)
    assert "\n" not in msg and msg
    return msg


def _write(tmp_path: Path, data: dict | str) -> Path:
    p = tmp_path / "spec.yaml"
    p.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return p


def _minimal(**extra: object) -> dict:
    """A small valid spec (absolute base path, data from the base config)."""
    spec = {"name": "t", "base": str(ROOT / "configs" / "tiny.yaml"), "grid": {"windows": [16, 32]},
            "objective": {"metric": M.VAL_LOSS}, "tolerance": {"kind": "absolute", "value": 0.1}}
    spec.update(extra)
    return spec


# ----- shipped specs ------------------------------------------------------------------------------------

def test_the_three_specs_are_shipped():
    assert {p.name for p in SPECS} >= {"demo.yaml", "paper-gpu.yaml", "recall.yaml"}


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_shipped_spec_validates(path: Path):
    spec = load_spec(path)
    assert spec.windows() == sorted(set(spec.windows())) and spec.windows()
    assert spec.direction() in ("minimize", "maximize")
    cfg = spec.base_config()
    ok, hint = M.produced_by(spec.objective.metric, cfg.eval, cfg.seq_len)
    assert ok, hint
    est = spec.estimate()
    assert est["trials"] > 0 and est["train_tokens_per_trial"] > 0 and est["train_flops_per_trial"] > 0
    assert est["train_tokens_total"] == est["trials"] * est["train_tokens_per_trial"]
    for kind in ("full", *spec.kinds):
        for w in [None] if kind == "full" else spec.windows():
            for seed in spec.seed_list():
                t = spec.trial_config(kind, w, seed, data_path=str(spec.folder() / "data"))
                assert (t.model.kind, t.train.seed, t.tracking.experiment) == (kind, seed, spec.name)
                assert t.model.window == (cfg.model.window if w is None else w)


def test_paper_gpu_setting():
    spec = load_spec(ROOT / "sweeps" / "paper-gpu.yaml")
    cfg = spec.base_config()
    from rattention.model import count_params

    assert cfg.seq_len == 4096
    assert 100e6 <= count_params(cfg.model) <= 400e6
    assert spec.windows() == [64, 128, 256, 512, 1024, 2048, 4096]
    assert (spec.resources.gpus, spec.parallel) == (1, 8)
    check_cluster(spec, {"CPU": 64, "GPU": 8})


def test_recall_setting():
    spec = load_spec(ROOT / "sweeps" / "recall.yaml")
    assert spec.objective.metric == "eval/mqar_acc_len256" and spec.direction() == "maximize"
    assert spec.data is not None and spec.data.synth["params"]["gap"] == 96
    assert [w for w in spec.windows() if w < 96] == [16, 32, 64]  # the gap lies beyond these
    assert spec.base_config().eval.task_params == {"mqar": {"num_pairs": 8, "gap": 96}}
    built = spec.data.builder_config(Path("/tmp/sweep/data"))
    assert (built.kind, built.seq_len, built.split, built.out) == ("mqar", 256, "train", Path("/tmp/sweep/data"))
    assert spec.base_config().data.train_split == built.split == spec.base_config().data.val_split


def test_demo_paths_and_storage():
    spec = load_spec(DEMO)
    assert Path(spec.base).resolve() == (ROOT / "configs" / "demo-copy.yaml").resolve()  # relative to the spec file
    assert spec.folder() == Path(".rattention/sweeps") / "demo"
    assert spec.storage_url() == str(spec.folder() / "optuna.journal") and spec.journal_path() is not None
    assert load_spec(DEMO, ["storage=sqlite:///x.db"]).journal_path() is None
    assert spec.seed_list() == [0, 1]
    assert spec.data is not None and spec.data.builder_config("d").vocab_size == 256
    assert load_spec(DEMO, ["seeds=[3,7]"]).seed_list() == [3, 7]


# ----- trials -----------------------------------------------------------------------------------------

def test_trial_config_sets_kind_window_seed_experiment(tmp_path: Path):
    spec = load_spec(DEMO)
    full = spec.trial_config("full", None, 1, data_path=str(tmp_path / "data"), run_root=tmp_path / "runs")
    assert (full.model.kind, full.model.window, full.train.seed) == ("full", 8, 1)
    assert full.model.nope_global is False  # a standard Transformer: RoPE on every layer
    assert full.tracking.experiment == "demo"
    assert full.data.path == str(tmp_path / "data") and full.train.out_dir == str(tmp_path / "runs")
    assert full.train.steps == 800 and full.eval.task_params == {"copy": {"span": 8, "gap": 24}}  # the base's
    for kind in ("swa", "rattention"):
        t = spec.trial_config(kind, 32, 0)
        assert (t.model.kind, t.model.window, t.train.seed) == (kind, 32, 0)
        assert t.model.nope_global is True  # the local-global kinds keep NoPE global layers
        assert t.data.path == spec.base_config().data.path  # no data path given: the base's


def test_trial_config_refuses_bad_arguments():
    spec = load_spec(DEMO)
    with pytest.raises(ConfigError, match=r"^window: "):
        spec.trial_config("swa", None, 0)
    with pytest.raises(ConfigError, match=r"^kind: "):
        spec.trial_config("gla", 16, 0)
    with pytest.raises(ConfigError, match=r"^trial swa window=-1 seed=0: .*model\.window"):
        spec.trial_config("swa", -1, 0)


def test_pareto_estimate_and_objectives():
    spec = load_spec(DEMO, ["mode=pareto", "pareto.trials=6"])
    assert spec.estimate()["trials"] == 6
    assert spec.objectives() == [("eval/copy_loss_len42", "minimize"), ("eff/cache_bytes_ctx32768", "minimize")]
    assert load_spec(DEMO, ["budget=10"]).estimate()["trials"] == 10  # the budget caps the bound


# ----- spec overrides ---------------------------------------------------------------------------------

def test_spec_overrides_parse_as_yaml():
    spec = load_spec(DEMO, ["parallel=2", "grid.windows=[16,32]", "tolerance.value=0.5"])
    assert spec.parallel == 2 and spec.windows() == [16, 32] and spec.tolerance.value == 0.5
    spec = load_spec(DEMO, ["grid={min: 4, max: 32, block: 4}"])
    assert spec.windows() == [4, 8, 16, 32]


# ----- bad specs: one line, naming the field ------------------------------------------------------------

@pytest.mark.parametrize(("overrides", "field", "words"), [
    (["kinds=[gla]"], "kinds:", "unknown kind 'gla'"),
    (["kinds=[full]"], "kinds:", "baseline"),
    (["kinds=[swa,swa]"], "kinds:", "distinct"),
    (["grid.windows=[]"], "grid.windows:", "empty"),
    (["grid.windows=[-16,32]"], "grid.windows:", "-16"),
    (["grid.windows=[6]"], "grid.windows:", "block grid"),
    (["grid.min=16", "grid.max=64"], "grid.windows:", "not both"),
    (["grid={min: 24, max: 64}"], "grid.min:", "power of two"),
    (["grid={min: 16}"], "grid.windows:", "min and max"),
    (["grid.block=0"], "grid.block:", "greater than 0"),
    (["grid.windows=[16,1024]"], "grid:", "seq_len"),
    (["tolerance.value=-0.1"], "tolerance.value:", "-0.1"),
    (["tolerance.value=.inf"], "tolerance.value:", "finite"),
    (["tolerance.kind=ratio"], "tolerance.kind:", "'ratio'"),
    (["seeds=1", "tolerance.kind=spread"], "tolerance.kind:", "2 seeds"),
    (["seeds=0"], "seeds:", "0"),
    (["objective.metric=eval/bogus"], "objective.metric:", "unknown metric 'eval/bogus'"),
    (["objective.metric=eval/copy_loss_d64"], "objective.metric:", "add 64 to eval.copy_distances (now [])"),
    (["objective.metric=eval/mqar_acc_len512"], "objective.metric:", "add mqar to eval.tasks"),
    (["objective.direction=up"], "objective.direction:", "'up'"),
    (["paralel=2"], "paralel:", "did you mean 'parallel'?"),
    (["grid.windos=[16]"], "grid.windos:", "did you mean 'windows'?"),
    (["name=a/b"], "name:", "'a/b'"),
    (["parallel=0"], "parallel:", "0"),
    (["budget=0"], "budget:", "0"),
    (["budget=1"], "budget:", "seeds"),
    (["resources.cpus=0"], "resources.cpus:", "0"),
    (["storage=optuna.db"], "storage:", "journal"),
    (["mode=grid"], "mode:", "'grid'"),
    (["overrides=[model.window=32]"], "overrides:", "set per trial"),
    (["overrides=[model.d_model=-1]"], "base config: model.d_model:", "-1"),
    (["data={prepare: {vocab: 3}}"], "data.prepare.vocab:", "did you mean 'vocab_size'?"),
    (["data={prepare: {out: x}}"], "data.prepare.out:", "set by the sweep"),
    (["data={prepare: {vocab_size: 16384}}"], "data.prepare.vocab_size:", "model.vocab_size=256"),
    (["data={path: /no/such/dataset}"], "data.path:", "not found"),
    (["data={}"], "data:", "exactly one"),
    (["mode=pareto", "pareto.context=1000"], "pareto.context:", "32768"),
    (["base=missing.yaml"], "base:", "run config not found"),
])
def test_bad_spec_names_its_field(overrides: list[str], field: str, words: str):
    msg = _error(DEMO, overrides)
    assert msg.startswith(field), msg
    assert words in msg, msg


def test_unknown_metric_suggests_the_close_name():
    msg = _error(DEMO, ["objective.metric=eval/copy_loss_128"])
    assert "did you mean 'eval/copy_loss_d128'?" in msg and "eval/{task}_acc_len{L}" in msg


def test_bad_synth_source():
    recall = ROOT / "sweeps" / "recall.yaml"
    assert _error(recall, ["data.synth.params.gapp=3"]).startswith("data.synth.params.gapp: not a parameter of mqar")
    assert _error(recall, ["data.synth.kind=maze"]).startswith("data.synth.kind:")
    assert _error(recall, ["data.synth.samples=0"]).startswith("data.synth.samples:")
    assert _error(recall, ["data.synth.seq_len=512"]).startswith("data.synth.seq_len: must equal model.seq_len=256")


def test_missing_base_config(tmp_path: Path):
    spec = _minimal(base="no-such-config.yaml")
    msg = _error(_write(tmp_path, spec))
    assert msg == f"base: {tmp_path / 'no-such-config.yaml'}: run config not found"
    spec.pop("base")
    assert _error(_write(tmp_path, spec)).startswith("base: required")


def test_base_relative_to_the_spec_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "run.yaml").write_text((ROOT / "configs" / "tiny.yaml").read_text())
    (tmp_path / "specs").mkdir()
    p = tmp_path / "specs" / "s.yaml"
    p.write_text(yaml.safe_dump(_minimal(base="../cfg/run.yaml")))
    monkeypatch.chdir(ROOT)
    assert Path(load_spec(p).base).resolve() == (tmp_path / "cfg" / "run.yaml").resolve()


def test_cuda_base_needs_gpus(tmp_path: Path):
    p = _write(tmp_path, _minimal(overrides=["train.device=cuda"]))
    assert _error(p).startswith("resources.gpus: the base config trains on cuda")
    assert load_spec(p, ["resources.gpus=1"]).resources.gpus == 1


def test_python_tag_is_refused(tmp_path: Path):
    marker = tmp_path / "ran"
    p = _write(tmp_path, f'name: x\nbase: !!python/object/apply:os.system ["touch {marker}"]\n')
    msg = _error(p)
    assert msg.startswith(str(p)) and "not allowed" in msg
    assert not marker.exists()


def test_not_a_mapping_and_bad_yaml(tmp_path: Path):
    assert "expected a mapping" in _error(_write(tmp_path, "- a\n- b\n"))
    assert "not valid YAML" in _error(_write(tmp_path, "name: [x\n"))


def test_missing_spec_file(tmp_path: Path):
    assert _error(tmp_path / "nope.yaml") == f"{tmp_path / 'nope.yaml'}: sweep spec not found"


def test_direct_construction_raises_config_error():
    with pytest.raises(ConfigError, match=r"^grid\.windows: window 3 is not on the block grid"):
        SweepSpec(**_minimal(grid={"windows": [3]}))
    spec = SweepSpec(**_minimal())
    assert spec.kinds == ["swa", "rattention"] and spec.mode == "minimal-window"


# ----- cluster fit ------------------------------------------------------------------------------------

def test_check_cluster_cpus():
    spec = load_spec(DEMO, ["parallel=4"])
    with pytest.raises(ConfigError) as info:
        check_cluster(spec, {"CPU": 2.0})
    assert str(info.value) == ("parallel: 4 slots x 1 CPU need 4 CPUs; the Ray cluster has 2 "
                               "(lower parallel or resources.cpus)")
    check_cluster(spec, {"CPU": 4.0})


def test_check_cluster_gpus():
    spec = load_spec(DEMO, ["resources.gpus=1"])
    with pytest.raises(ConfigError, match=r"^resources\.gpus: .*no GPUs"):
        check_cluster(spec, {"CPU": 8.0})
    spec = load_spec(DEMO, ["resources.gpus=1", "parallel=4"])
    with pytest.raises(ConfigError, match=r"^parallel: 4 slots x 1 GPU need 4 GPUs; the Ray cluster has 2"):
        check_cluster(spec, {"CPU": 8.0, "GPU": 2.0})
    check_cluster(load_spec(DEMO), {"CPU": 2.0})  # a CPU spec on a CPU cluster


# ----- metric names -----------------------------------------------------------------------------------

@pytest.mark.parametrize(("name", "parsed"), [
    ("eval/val_loss", {"family": "val_loss"}),
    ("eval/val_loss_pos_64_256", {"family": "val_loss_bucket", "lo": 64, "hi": 256}),
    ("eval/val_loss_pos_256_end", {"family": "val_loss_bucket", "lo": 256, "hi": None}),
    ("eval/copy_loss_d64", {"family": "copy_loss", "distance": 64}),
    ("eval/mqar_acc_len1024", {"family": "task_accuracy", "task": "mqar", "length": 1024}),
    ("eff/cache_bytes_ctx32768", {"family": "cache_bytes", "context": 32768}),
    ("eff/train_tokens_per_s", {"family": "train_throughput"}),
])
def test_parse_metric(name: str, parsed: dict):
    got = M.parse_metric(name)
    assert got is not None and {k: got[k] for k in parsed} == parsed
    assert M.is_canonical(name)


@pytest.mark.parametrize("name", ["eval/bogus", "eval/copy_loss_d0", "eval/copy_loss_d064", "eval/gla_acc_len256",
                                  "eval/val_loss_pos_256_64", "eff/cache_bytes_ctx", "val_loss", ""])
def test_parse_metric_unknown(name: str):
    assert M.parse_metric(name) is None and not M.is_canonical(name)


def test_every_builder_name_is_canonical():
    for name in (M.VAL_LOSS, M.TRAIN_LOSS, M.MFU, M.val_loss_bucket(0, 64), M.val_loss_bucket(64, None),
                 M.copy_loss(128), M.task_accuracy("niah", 512), M.cache_bytes_at(2048)):
        assert M.is_canonical(name), name


def test_default_direction():
    assert M.default_direction("eval/mqar_acc_len256") == "maximize"
    assert M.default_direction(M.TRAIN_THROUGHPUT) == "maximize"
    assert M.default_direction(M.DECODE_THROUGHPUT) == "maximize"
    assert M.default_direction(M.MFU) == "maximize"
    assert M.default_direction(M.VAL_LOSS) == "minimize"
    assert M.default_direction("eval/copy_loss_d64") == "minimize"
    assert M.default_direction(M.cache_bytes_at(32768)) == "minimize"


def test_produced_by():
    ev = EvalConfig(buckets=[0, 64, 256], copy_distances=[16, 64], tasks=["mqar"], task_lengths=[1, 2])
    T = 512
    for name in (M.VAL_LOSS, "eval/val_loss_pos_0_64", "eval/val_loss_pos_64_256", "eval/val_loss_pos_256_end",
                 "eval/copy_loss_d16", "eval/mqar_acc_len512", "eval/mqar_acc_len1024",
                 "eff/cache_bytes_ctx512", "eff/cache_bytes_ctx2048", "eff/cache_bytes_ctx32768", M.PARAMS):
        assert M.produced_by(name, ev, T) == (True, ""), name
    ok, hint = M.produced_by("eval/copy_loss_d128", ev, T)
    assert not ok and hint == "add 128 to eval.copy_distances (now [16, 64])"
    assert "eval.copy_distances is unset" in M.produced_by("eval/copy_loss_d128", EvalConfig(), T)[1]
    assert "eval.buckets" in M.produced_by("eval/val_loss_pos_64_end", ev, T)[1]
    assert "add 4 to eval.task_lengths" in M.produced_by("eval/mqar_acc_len2048", ev, T)[1]
    assert "add niah to eval.tasks" in M.produced_by("eval/niah_acc_len512", ev, T)[1]
    assert not M.produced_by("eval/val_loss_pos_256_end", ev, 256)[0]  # 256 is no bucket start below T
    assert M.produced_by("eval/val_loss_pos_64_end", ev, 256)[0]  # at T=256 the bucket from 64 runs to the end
    assert not M.produced_by(M.VAL_LOSS, EvalConfig(enabled=False), T)[0]
    assert M.produced_by(M.TRAIN_THROUGHPUT, EvalConfig(enabled=False), T)[0]
    assert not M.produced_by(M.DECODE_THROUGHPUT, EvalConfig(decode_tokens=0), T)[0]
