"""Config: YAML -> typed dataclasses, overrides, and one error listing every problem."""

import subprocess
import sys
import textwrap

import pytest

from ray_dpo.config import (
    ConfigError,
    LossConfig,
    RunConfig,
    apply_overrides,
    flatten,
    from_dict,
    load_config,
    to_yaml,
)


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    return path


def minimal(data_file, **sections):
    cfg = {"model": {"name_or_path": "some-org/some-model"}, "data": {"train_files": [str(data_file)]}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def write(tmp_path, text):
    path = tmp_path / "run.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_minimal_config_gets_documented_defaults(data_file):
    cfg = from_dict(minimal(data_file))
    assert isinstance(cfg, RunConfig)
    assert cfg.loss == LossConfig()  # sigmoid, beta 0.1
    assert cfg.policy.num_workers == 1 and cfg.policy.zero_stage == 0
    assert cfg.tracking.mlflow.experiment == "ray_dpo"
    assert cfg.data.train_files == [str(data_file)]


def test_yaml_file_types_are_converted(tmp_path, data_file):
    path = write(tmp_path, f"""
        run: {{name: t1, storage_path: {tmp_path}/runs}}
        model: {{name_or_path: org/m, dtype: fp32}}
        data: {{train_files: {data_file}, max_length: 64, max_prompt_length: 32}}
        loss: {{type: ipo, beta: 1e-1}}
        policy: {{learning_rate: 1e-6, zero_stage: 2, resources: {{policy_node: 0.01}}}}
        tracking: {{mlflow: {{tracking_uri: "sqlite:///x.db", experiment: exp}}}}
    """)
    cfg = load_config(str(path))
    assert cfg.data.train_files == [str(data_file)]  # a single path becomes a list
    assert cfg.loss.beta == pytest.approx(0.1) and cfg.loss.type == "ipo"
    assert cfg.policy.learning_rate == pytest.approx(1e-6)  # "1e-6" is a str to PyYAML
    assert cfg.policy.resources == {"policy_node": 0.01}
    assert cfg.tracking.mlflow.tracking_uri == "sqlite:///x.db"
    assert cfg.run_dir == f"{tmp_path}/runs/t1"


def test_overrides_parse_yaml_values_and_create_sections(data_file):
    data = apply_overrides(minimal(data_file), ["loss.beta=0.5", "policy.zero_stage=3",
                                               "online.sampling.top_p=0.9", "data.train_files=[a, b]"])
    assert data["loss"]["beta"] == 0.5
    assert data["online"]["sampling"]["top_p"] == 0.9
    assert data["data"]["train_files"] == ["a", "b"]


def test_override_without_equals_is_an_error(data_file):
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_overrides(minimal(data_file), ["loss.beta"])


def test_all_problems_reported_at_once_with_key_paths(data_file):
    bad = minimal(data_file, loss={"beta": 0, "tpye": "sigmoid"}, policy={"num_workers": "two"})
    with pytest.raises(ConfigError) as info:
        from_dict(bad)
    keys = {p.key for p in info.value.problems}
    assert keys == {"loss.beta", "loss.tpye", "policy.num_workers"}
    text = str(info.value)
    assert "did you mean 'type'" in text
    assert "loss.beta: must be > 0, got 0" in text
    assert "expected an integer" in text


def test_unknown_loss_lists_valid_names(data_file):
    with pytest.raises(ConfigError, match=r"unknown loss 'sigmod' \(did you mean 'sigmoid'\?\); valid: .*hinge.*ipo"):
        from_dict(minimal(data_file, loss={"type": "sigmod"}))


def test_choice_fields_suggest_the_closest_choice(data_file):
    with pytest.raises(ConfigError, match=r"data.over_length: got 'truncate_promt'.*did you mean 'truncate_prompt'"):
        from_dict(minimal(data_file, data={"over_length": "truncate_promt"}))


def test_unknown_section_is_reported(data_file):
    with pytest.raises(ConfigError, match=r"polcy: unknown key \(did you mean 'policy'\?\)"):
        from_dict({**minimal(data_file), "polcy": {}})


@pytest.mark.parametrize("key,value,message", [
    ("policy.zero_stage", 4, "must be 0, 1, 2 or 3"),
    ("loss.label_smoothing", 0.5, r"must be in \[0, 0.5\)"),
    ("data.max_prompt_length", 2048, "must be < data.max_length"),
    ("online.sampling.top_p", 0.0, r"must be in \(0, 1\]"),
    ("policy.adam_betas", [0.9], "must be two numbers"),
])
def test_range_checks(data_file, key, value, message):
    data = apply_overrides(minimal(data_file), [f"{key}={value}"])
    with pytest.raises(ConfigError, match=message):
        from_dict(data)


def test_missing_files_are_named(tmp_path, data_file):
    data = minimal(data_file, data={"train_files": [str(tmp_path / "nope.jsonl"), str(tmp_path / "*.parquet")]},
                   model={"name_or_path": str(tmp_path / "no-model")})
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    text = str(info.value)
    assert "data.train_files[0]: no such file or directory" in text
    assert "data.train_files[1]: glob" in text and "matches no file" in text
    assert "model.name_or_path: no such file or directory" in text


def test_remote_uris_are_not_checked_locally(data_file):
    cfg = from_dict(minimal(data_file, data={"train_files": ["s3://bucket/prefs/"]}))
    assert cfg.data.train_files == ["s3://bucket/prefs/"]


def test_online_needs_a_judge(data_file):
    with pytest.raises(ConfigError, match="online.judge: online DPO needs a judge"):
        from_dict(minimal(data_file, online={"enabled": True}))


def test_round_trip_through_yaml_and_flatten(tmp_path, data_file):
    cfg = from_dict(minimal(data_file, loss={"beta": 0.2}))
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg
    flat = flatten(cfg)
    assert flat["loss.beta"] == "0.2" and flat["tracking.mlflow.experiment"] == "ray_dpo"


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"))
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(write(tmp_path, "run: [unclosed\n")))


def test_yaml_is_loaded_safely(tmp_path):
    path = write(tmp_path, "run: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(path))


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "ray_dpo.cli", *args], capture_output=True, text=True)


def test_cli_validate_reports_three_problems_and_exits_2(tmp_path, data_file):
    path = write(tmp_path, f"""
        model: {{name_or_path: org/m}}
        data: {{train_files: [{data_file}]}}
        loss: {{beta: 0}}
        policy: {{num_workers: two, micro_batch_sise: 4}}
    """)
    proc = run_cli("validate", str(path))
    assert proc.returncode == 2, proc.stderr
    assert "3 problem(s)" in proc.stderr
    assert "loss.beta: must be > 0" in proc.stderr
    assert "policy.num_workers: got 'two'" in proc.stderr
    assert "policy.micro_batch_sise: unknown key (did you mean 'micro_batch_size'?)" in proc.stderr


def test_cli_validate_prints_resolved_config(tmp_path, data_file):
    path = write(tmp_path, f"""
        model: {{name_or_path: org/m}}
        data: {{train_files: [{data_file}]}}
    """)
    proc = run_cli("validate", str(path), "--set", "loss.beta=0.3")
    assert proc.returncode == 0, proc.stderr
    assert "beta: 0.3" in proc.stdout and "zero_stage: 0" in proc.stdout


def test_cli_validate_warns_of_local_storage_when_roles_are_pinned_to_node_pools(tmp_path, data_file):
    path = write(tmp_path, f"""
        model: {{name_or_path: org/m}}
        data: {{train_files: [{data_file}]}}
        run: {{storage_path: {tmp_path}/runs}}
        policy: {{resources: {{policy_node: 1}}}}
    """)
    proc = run_cli("validate", str(path))
    assert proc.returncode == 0, proc.stderr
    [warning] = [line for line in proc.stdout.splitlines() if "run.storage_path=" in line]
    assert warning.startswith("# warning: run.storage_path=") and "(policy.resources)" in warning
    assert "s3://" in warning
    shared = run_cli("validate", str(path), "--set", "run.storage_path=s3://bucket/runs",
                     "--set", "tracking.mlflow.tracking_uri=http://mlflow:5000")
    assert shared.returncode == 0, shared.stderr
    assert "run.storage_path=" not in shared.stdout


def test_local_paths_become_absolute_for_workers(tmp_path, data_file, monkeypatch):
    from ray_dpo.config import with_absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "model").mkdir()
    cfg = from_dict(minimal(data_file, model={"name_or_path": "./model"},
                            data={"train_files": ["train.jsonl", "s3://b/x.jsonl"]},
                            run={"storage_path": "runs"}))
    fixed = with_absolute_paths(cfg)
    assert fixed.model.name_or_path == str(tmp_path / "model")
    assert fixed.data.train_files == [str(tmp_path / "train.jsonl"), "s3://b/x.jsonl"]
    assert fixed.run.storage_path == str(tmp_path / "runs")
    hub = with_absolute_paths(from_dict(minimal(data_file)))
    assert hub.model.name_or_path == "some-org/some-model"  # a hub id is not a path


def test_layout_and_token_budget_defaults_and_overrides(data_file):
    cfg = from_dict(minimal(data_file))
    assert (cfg.policy.layout, cfg.policy.max_tokens_per_micro_batch) == ("padded", None)
    assert (cfg.reference.layout, cfg.reference.max_tokens_per_row) == ("padded", None)
    # zero_stage 1: the default bf16 without ZeRO refuses a token budget
    # (test_bf16_without_zero_is_refused_where_a_step_accumulates)
    cfg = from_dict(minimal(data_file, policy={"layout": "packed", "max_tokens_per_micro_batch": 4096,
                                               "zero_stage": 1},
                            reference={"layout": "prefix_shared", "max_tokens_per_row": 2048},
                            model={"attn_implementation": "sdpa"}))
    assert (cfg.policy.layout, cfg.policy.max_tokens_per_micro_batch) == ("packed", 4096)
    assert (cfg.reference.layout, cfg.reference.max_tokens_per_row) == ("prefix_shared", 2048)


@pytest.mark.parametrize("key,value,message", [
    ("policy.max_tokens_per_micro_batch", 0, "policy.max_tokens_per_micro_batch: must be > 0, got 0"),
    ("reference.max_tokens_per_row", -5, "reference.max_tokens_per_row: must be > 0, got -5"),
    ("policy.max_tokens_per_row", 0, "policy.max_tokens_per_row: must be > 0, got 0"),
    ("policy.layout", "pakced", "policy.layout: got 'pakced', expected one of 'padded', 'packed', "
                                "'prefix_shared' (did you mean 'packed'?)"),
])
def test_layout_and_token_budget_are_checked(data_file, key, value, message):
    section, name = key.split(".")
    with pytest.raises(ConfigError) as err:
        from_dict(minimal(data_file, **{section: {name: value}}))
    assert message in str(err.value)


def test_prefix_shared_needs_a_4d_mask_attention(data_file):
    with pytest.raises(ConfigError) as err:
        from_dict(minimal(data_file, model={"attn_implementation": "flash_attention_2"},
                          policy={"layout": "prefix_shared"}, reference={"layout": "prefix_shared"}))
    assert "2 problem(s)" in str(err.value)
    assert "policy.layout: prefix_shared needs a 4D attention mask" in str(err.value)
    assert "reference.layout: prefix_shared needs a 4D attention mask" in str(err.value)
    ok = from_dict(minimal(data_file, model={"attn_implementation": "flash_attention_2"},
                           policy={"layout": "packed"}))
    assert ok.policy.layout == "packed"  # packed runs on flash varlen


# --------------------------------------------------------------------------- online / held-out eval checks

JUDGE = {"judge": {"function": "ray_dpo.testing.assets:judge_score"}}


def problems_of(data):
    """{key: message} of every problem from_dict reports (fails if it reports none)."""
    with pytest.raises(ConfigError) as info:
        from_dict(data)
    return {p.key: p.message for p in info.value.problems}


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "describe the river"}\n')
    return path


def test_eval_prompts_file_needs_a_judge(data_file, prompts_file):
    from ray_dpo.config.derived import heldout_judge
    from ray_dpo.engines.follower import FollowerSpec
    from ray_dpo.engines.spec import engine_spec

    problems = problems_of(minimal(data_file, eval={"prompts_file": str(prompts_file)}))
    assert set(problems) == {"eval.judge"}
    assert "set eval.judge.function" in problems["eval.judge"] and "online.judge" in problems["eval.judge"]
    cfg = from_dict(minimal(data_file, eval={"prompts_file": str(prompts_file)}, online=JUDGE))
    assert cfg.eval.prompts_file == str(prompts_file) and not cfg.online.enabled  # offline run, judged eval
    assert heldout_judge(cfg) is cfg.online.judge  # falls back to online.judge
    # Its own section: an offline run needs no online.* key to evaluate.
    own = {"prompts_file": str(prompts_file), "backend": "transformers", **JUDGE}
    cfg = from_dict(minimal(data_file, eval=own))
    assert heldout_judge(cfg).function == JUDGE["judge"]["function"] and not cfg.online.judge.function
    assert engine_spec(cfg).backend == "transformers" and engine_spec(cfg).num_engines == cfg.online.num_engines
    spec = FollowerSpec.of(cfg, total_steps=8)  # the held-out follower of an offline run: no online section
    assert spec.online is None and spec.judge == spec.eval_judge == cfg.eval.judge


def test_eval_judge_and_backend_are_checked(data_file, prompts_file):
    eval_ = {"prompts_file": str(prompts_file), "backend": "sglang", "judge": {"function": "no_such_pkg.mod:fn"}}
    problems = problems_of(minimal(data_file, eval=eval_))
    assert set(problems) == {"eval.backend", "eval.judge.function"}
    assert "no module named 'no_such_pkg'" in problems["eval.judge.function"]
    online = {"enabled": True, "backend": "vllm", **JUDGE}
    problems = problems_of(minimal(data_file, online=online, eval={**eval_, "backend": "transformers", **JUDGE}))
    assert set(problems) == {"eval.backend"} and "round engines" in problems["eval.backend"]


def test_only_one_judge_may_be_set(data_file):
    both = {"judge": {"function": "ray_dpo.testing.assets:judge_score", "reward_model": "org/reward-model"}}
    problems = problems_of(minimal(data_file, online={"enabled": True, **both}))
    assert set(problems) == {"online.judge"}
    assert "only one of online.judge.function and online.judge.reward_model" in problems["online.judge"]
    assert from_dict(minimal(data_file, online={"enabled": True, "judge": {"reward_model": "org/rm"}}))


def test_best_vs_worst_needs_two_samples(data_file):
    online = {"enabled": True, "pair_strategy": "best_vs_worst", **JUDGE}
    problems = problems_of(minimal(data_file, online={**online, "samples_per_prompt": 1}))
    assert set(problems) == {"online.samples_per_prompt"}
    assert "best_vs_worst" in problems["online.samples_per_prompt"]
    assert from_dict(minimal(data_file, online={**online, "samples_per_prompt": 2}))
    # regenerate_rejected compares against the data set's chosen: one sample is enough
    assert from_dict(minimal(data_file, online={"enabled": True, "samples_per_prompt": 1, **JUDGE}))


def test_online_cannot_precompute_reference_logprobs(data_file):
    problems = problems_of(minimal(data_file, online={"enabled": True, **JUDGE}, reference={"precompute": True}))
    assert set(problems) == {"reference.precompute"}
    assert from_dict(minimal(data_file, reference={"precompute": True}))  # offline: fine


def test_weight_sync_methods_and_the_collective_settings_are_checked(data_file):
    problems = problems_of(minimal(data_file, online={"enabled": True, "weight_sync": "nccl", **JUDGE}))
    assert set(problems) == {"online.weight_sync"}
    assert all(m in problems["online.weight_sync"] for m in ("object_store", "checkpoint", "collective"))
    problems = problems_of(minimal(data_file, online={"enabled": True, "weight_sync": "collective",
                                                      "sync_bucket_mb": 0, "sync_timeout_s": -1, **JUDGE}))
    assert problems == {"online.sync_bucket_mb": "must be > 0, got 0.0", "online.sync_timeout_s": "must be > 0, got -1.0"}
    cfg = from_dict(minimal(data_file, online={"enabled": True, "weight_sync": "collective", **JUDGE}))
    assert (cfg.online.sync_bucket_mb, cfg.online.sync_timeout_s) == (256.0, 1800.0)


@pytest.mark.parametrize("key,value", [
    ("eval.num_prompts", 0), ("eval.num_prompts", -3), ("eval.samples_per_prompt", 0),
])
def test_eval_sampling_sizes_must_be_positive(data_file, key, value):
    section, name = key.split(".")
    problems = problems_of(minimal(data_file, **{section: {name: value}}))
    assert problems == {key: f"must be > 0, got {value}"}


def test_all_new_online_problems_are_reported_together(data_file, prompts_file):
    data = minimal(data_file,
                   online={"enabled": True, "pair_strategy": "best_vs_worst", "samples_per_prompt": 1,
                           "weight_sync": "broadcast", "judge": {"function": "ray_dpo.testing.assets:judge_score", "reward_model": "org/rm"}},
                   reference={"precompute": True},
                   eval={"prompts_file": str(prompts_file), "num_prompts": 0})
    assert set(problems_of(data)) == {"online.judge", "online.samples_per_prompt", "reference.precompute",
                                      "online.weight_sync", "eval.num_prompts"}


def test_engine_and_judge_placement_keys_default_and_parse(data_file):
    cfg = from_dict(minimal(data_file))
    assert (cfg.online.num_cpus_per_engine, cfg.online.resources) == (1.0, {})
    assert (cfg.online.judge.num_cpus_per_actor, cfg.online.judge.resources) == (1.0, {})
    cfg = from_dict(minimal(data_file, online={"num_cpus_per_engine": 4, "resources": {"generation_node": 0.01},
                                               "judge": {"num_cpus_per_actor": 2, "resources": {"judge_node": 1}}}))
    assert (cfg.online.num_cpus_per_engine, cfg.online.resources) == (4.0, {"generation_node": 0.01})
    assert (cfg.online.judge.num_cpus_per_actor, cfg.online.judge.resources) == (2.0, {"judge_node": 1.0})
    assert isinstance(cfg.online.judge.resources["judge_node"], float)
    assert from_dict(minimal(data_file, online={"num_cpus_per_engine": 0, "judge": {"num_cpus_per_actor": 0}}))


@pytest.mark.parametrize("online,key,message", [
    ({"num_cpus_per_engine": -1}, "online.num_cpus_per_engine", "must be >= 0, got -1.0"),
    ({"judge": {"num_cpus_per_actor": -0.5}}, "online.judge.num_cpus_per_actor", "must be >= 0, got -0.5"),
    ({"resources": {"generation_node": -0.01}}, "online.resources.generation_node", "must be >= 0, got -0.01"),
    ({"judge": {"resources": {"judge_node": -1}}}, "online.judge.resources.judge_node", "must be >= 0, got -1.0"),
    ({"resources": {"GPU": 1}}, "online.resources.GPU", "set online.num_gpus_per_engine instead"),
    ({"judge": {"resources": {"CPU": 1}}}, "online.judge.resources.CPU", "set online.judge.num_cpus_per_actor"),
    ({"resources": {"generation_node": "lots"}}, "online.resources.generation_node", "expected a number"),
    ({"resources": [1]}, "online.resources", "expected a mapping of a string to a number"),
])
def test_engine_and_judge_placement_keys_are_checked(data_file, online, key, message):
    problems = problems_of(minimal(data_file, online=online))
    assert set(problems) == {key} and message in problems[key]


# --------------------------------------------------------------------------- chat template, --set

INLINE = "{% for m in messages %}{{ m['content'] }}{% endfor %}"


def test_chat_template_is_a_file_or_inline_jinja(tmp_path, data_file):
    from ray_dpo.config import with_absolute_paths

    assert from_dict(minimal(data_file, model={"chat_template": INLINE})).model.chat_template == INLINE
    template_file = tmp_path / "t.jinja"
    template_file.write_text(INLINE)
    assert from_dict(minimal(data_file, model={"chat_template": str(template_file)})).model.chat_template
    with pytest.raises(ConfigError, match=r"model\.chat_template: 'chatml' is not a file nor an inline Jinja"):
        from_dict(minimal(data_file, model={"chat_template": "chatml"}))
    with pytest.raises(ConfigError, match=r"model\.chat_template: inline Jinja template does not compile"):
        from_dict(minimal(data_file, model={"chat_template": "{% for m in messages %}"}), check_files=False)
    # Inline templates are not paths: with_absolute_paths leaves them alone.
    cfg = with_absolute_paths(from_dict(minimal(data_file, model={"chat_template": INLINE})))
    assert cfg.model.chat_template == INLINE


def test_set_value_that_is_not_yaml_becomes_a_string():
    data = apply_overrides({}, ["model.chat_template={% if x %}a{% endif %}", "loss.beta=0.2",
                                "data.train_files=[a.jsonl, b.jsonl]", "run.name={{ x }}"])
    assert data["model"]["chat_template"] == "{% if x %}a{% endif %}"
    assert data["loss"]["beta"] == 0.2 and data["data"]["train_files"] == ["a.jsonl", "b.jsonl"]
    assert data["run"]["name"] == "{{ x }}"


@pytest.fixture
def tiny_cpu_overrides(tiny_assets):
    import json

    return ["--set", f"model.name_or_path={tiny_assets['model']}",
            "--set", f"data.train_files={json.dumps([str(tiny_assets['train_glob'])])}",
            "--set", f"data.eval_files={json.dumps([str(tiny_assets['eval_file'])])}"]


def test_cli_set_inline_template_never_tracebacks(tiny_cpu_overrides, capsys):
    from pathlib import Path

    from ray_dpo.cli import main

    config = str(Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml")
    template = "{% if x %}a{% endif %}"
    assert main(["validate", config, *tiny_cpu_overrides, "--set", f"model.chat_template={template}"]) == 0
    assert template in capsys.readouterr().out
    # Not YAML and not a usable value for the key: a config error (exit 2), not a traceback.
    assert main(["validate", config, *tiny_cpu_overrides, "--set", "model.chat_template={% if x %}a"]) == 2
    assert "model.chat_template: inline Jinja template does not compile" in capsys.readouterr().err
    assert main(["validate", config, *tiny_cpu_overrides, "--set", "data.max_length=[64"]) == 2
    assert "data.max_length" in capsys.readouterr().err


def test_local_cluster_cpus_follow_the_actors_the_config_starts():
    from ray_dpo.config import RunConfig, local_cpus_needed

    cfg = RunConfig()
    base = local_cpus_needed(cfg)  # 1 worker + 1 reference actor + 1 for data tasks
    assert base == 3
    cfg.policy.num_workers, cfg.reference.num_actors = 2, 2
    assert local_cpus_needed(cfg) == 5
    cfg.eval.prompts_file = "heldout.jsonl"  # held-out sampling starts an engine
    assert local_cpus_needed(cfg) == 6
    cfg.online.judge.reward_model, cfg.online.judge.num_actors = "rm", 2
    assert local_cpus_needed(cfg) == 8


def test_a_duplicate_yaml_key_is_an_error_naming_it(tmp_path, data_file):
    path = write(tmp_path, f"""
        model: {{name_or_path: org/m}}
        data: {{train_files: {data_file}}}
        loss:
          beta: 0.1
          beta: 0.5
    """)
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    assert "loss.beta: appears twice (lines 5 and 6)" in str(err.value)


@pytest.mark.parametrize("name", ["..", "a/../b", "x..y", "a\\b"])
def test_a_run_name_that_would_be_a_path_is_refused(data_file, name):
    with pytest.raises(ConfigError, match="run.name"):
        from_dict(minimal(data_file, run={"name": name}))


def test_a_judge_module_that_does_not_exist_is_refused(data_file):
    cfg = minimal(data_file, online={"enabled": True, "judge": {"function": "no_such_pkg.judges:score"}})
    with pytest.raises(ConfigError, match=r"online.judge.function: no module named 'no_such_pkg'"):
        from_dict(cfg)
    cfg["online"]["judge"]["function"] = "ray_dpo.no_such_module:score"
    with pytest.raises(ConfigError, match=r"no module named 'ray_dpo.no_such_module'"):
        from_dict(cfg)
    cfg["online"]["judge"]["function"] = "ray_dpo.testing.assets:judge_score"
    assert from_dict(cfg).online.judge.function == "ray_dpo.testing.assets:judge_score"


@pytest.mark.parametrize("key", ["num_checkpoints_to_keep", "max_failures", "sigterm_grace_s"])
def test_checkpoint_and_failure_counts_are_checked(data_file, key):
    with pytest.raises(ConfigError, match=f"policy.{key}: must be"):
        from_dict(minimal(data_file, policy={key: -1}))
    assert from_dict(minimal(data_file)).policy.max_failures == 3


def test_reference_actors_load_the_model_the_way_the_policy_does(data_file):
    """The driver/reference seam: remote code and the attention implementation reach the
    reference actors (config validation checks reference.layout against the latter)."""
    import inspect

    from ray_dpo.driver import reference_group_kwargs
    from ray_dpo.reference.group import ReferenceGroup

    cfg = from_dict(minimal(data_file, model={"trust_remote_code": True, "attn_implementation": "eager"},
                            reference={"layout": "prefix_shared"}))
    kwargs = reference_group_kwargs(cfg, gpu=False)
    assert kwargs["trust_remote_code"] is True and kwargs["attn_implementation"] == "eager"
    assert kwargs["model_path"] == "some-org/some-model" and kwargs["config"].layout == "prefix_shared"
    assert set(kwargs) <= set(inspect.signature(ReferenceGroup.__init__).parameters)


def test_min_workers_must_fit_under_num_workers():
    from ray_dpo.config import PolicyConfig, RunConfig
    from ray_dpo.config.checks import check

    def problems(**policy):
        cfg = RunConfig(policy=PolicyConfig(**policy))
        cfg.model.name_or_path, cfg.data.train_files = "m", ["x.jsonl"]
        return [str(p) for p in check(cfg, check_files=False) if p.key == "policy.min_workers"]

    assert problems(num_workers=4, min_workers=2, zero_stage=3) == []
    [too_many] = problems(num_workers=2, min_workers=3)
    assert "must be <= policy.num_workers (2), got 3" in too_many
    assert problems(num_workers=2, min_workers=0) == ["policy.min_workers: must be > 0, got 0"]


def test_bf16_without_zero_is_refused_where_a_step_accumulates(data_file):
    # DeepSpeed 0.19 sums ZeRO-0 bf16 gradients over micro-batches in bf16 (and refuses fp32
    # accumulation there); ZeRO 1-3 accumulate in fp32 (policy.ds_config).
    accumulating = {"gradient_accumulation_steps": 2, "max_tokens_per_micro_batch": 4096,
                    "num_workers": 2, "min_workers": 1}
    with pytest.raises(ConfigError) as err:
        from_dict(minimal(data_file, model={"dtype": "bf16"}, policy={**accumulating, "zero_stage": 0}))
    message = str(err.value)
    for key in ("policy.gradient_accumulation_steps", "policy.max_tokens_per_micro_batch", "policy.min_workers"):
        assert f"{key}: " in message and "set policy.zero_stage=1" in message
    assert "3 problem(s)" in message
    from_dict(minimal(data_file, model={"dtype": "bf16"}, policy={**accumulating, "zero_stage": 1}))
    from_dict(minimal(data_file, model={"dtype": "fp32"}, policy={**accumulating, "zero_stage": 0}))
    from_dict(minimal(data_file, model={"dtype": "bf16"}, policy={"zero_stage": 0}))  # one backward a step
