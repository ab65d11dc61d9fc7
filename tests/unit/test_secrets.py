"""Credentials in a config's URLs: found in every field, refused by `ray-dpo k8s` with the
Secret to use, and masked in what a run logs (params, tags, texts, console, log records)."""

from __future__ import annotations

import logging
import os

import pytest

from ray_dpo import cli, console, k8s
from ray_dpo.config import load_config, to_yaml
from ray_dpo.config.secrets import MASK, credentials, redact, redact_config, url_credentials

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
REAL_CONFIG = os.path.join(CONFIGS, "llama3-8b-offline-2x8.yaml")
STORAGE = "pvc:ray-dpo-runs"

PRESIGNED = ("https://bucket.s3.amazonaws.com/train.jsonl?X-Amz-Algorithm=AWS4-HMAC-SHA256"
             "&X-Amz-Credential=AKIAEXAMPLE%2F20261207&X-Amz-Signature=deadbeef&X-Amz-Expires=3600")


@pytest.mark.parametrize("url, holds", [
    ("http://alice:s3cret@mlflow:5000", "a password in its user part"),
    ("https://hf_abc123@huggingface.co/org/model", "a user name or token in its user part"),
    ("https://data.example.com/pairs.jsonl?token=abc", "a secret in its query string (token=)"),
    (PRESIGNED, "a secret in its query string (X-Amz-Credential=, X-Amz-Signature=)"),
    ("https://acct.blob.core.windows.net/c/p.jsonl?sv=2024&sig=XYZ", "a secret in its query string (sig=)"),
])
def test_a_credential_in_the_user_part_or_the_query_is_found_and_masked(url, holds):
    assert url_credentials(url) == [holds]
    masked = redact(f"reading {url} now")
    assert masked.startswith("reading ") and masked.endswith(" now")
    for secret in ("s3cret", "hf_abc123", "token=abc", "deadbeef", "AKIAEXAMPLE", "sig=XYZ"):
        assert secret not in masked
    assert MASK in masked


@pytest.mark.parametrize("value", [
    "s3://bucket/prefix/train-*.jsonl", "HuggingFaceTB/SmolLM2-135M", "/mnt/data/pairs.jsonl",
    "https://host/data.jsonl?version=3&split=train", "sqlite:////tmp/x/mlflow.db", "http://mlflow:5000",
    "token=abc without a URL", "",
])
def test_plain_urls_paths_and_ids_hold_no_credential_and_stay_as_they_are(value):
    assert url_credentials(value) == []
    assert redact(value) == value


def config_with(tmp_path, **overrides):
    return k8s.load_for_cluster(REAL_CONFIG, [f"{k}={v}" for k, v in overrides.items()], k8s.Storage.parse(STORAGE))


def test_every_url_valued_field_is_checked_and_named_with_its_index(tmp_path):
    cfg = config_with(tmp_path, **{"data.train_files": f"['s3://b/a.jsonl', '{PRESIGNED}']",
                                   "model.name_or_path": "https://tok@huggingface.co/m",
                                   "tracking.mlflow.tracking_uri": "https://mlflow.example.com/?access_token=t0k"})
    keys = [key for key, _ in credentials(cfg)]
    assert sorted(keys) == ["data.train_files[1]", "model.name_or_path", "tracking.mlflow.tracking_uri"]
    clean = redact_config(cfg)
    assert credentials(clean) == []
    assert clean.data.train_files[0] == "s3://b/a.jsonl"  # untouched
    assert clean.model.name_or_path == f"https://{MASK}@huggingface.co/m"
    text = to_yaml(clean)
    for secret in ("tok@", "deadbeef", "t0k"):
        assert secret not in text
    assert redact_config(config_with(tmp_path)) == config_with(tmp_path)  # nothing to hide: the same


@pytest.mark.parametrize("key, value, secret", [
    ("tracking.mlflow.tracking_uri", "http://u:pw@mlflow:5000", "--mlflow-secret"),
    ("tracking.mlflow.tracking_uri", "https://mlflow.example.com?token=abc", "--mlflow-secret"),
    ("data.train_files", f"['{PRESIGNED}']", "--object-store-secret"),
    ("model.name_or_path", "https://hf_x@huggingface.co/org/m", "--hf-secret"),
])
def test_k8s_refuses_a_credential_in_any_url_field_naming_the_key_and_the_secret(capsys, key, value, secret):
    """`ray-dpo k8s` exits 2 with the key and the Secret to use, and writes no manifest."""
    code = cli.main(["k8s", REAL_CONFIG, "--storage", STORAGE, "--set", f"{key}={value}"])
    out, err = capsys.readouterr()
    assert code == 2 and out == ""
    assert key in err and secret in err
    for leaked in ("pw@", "abc", "deadbeef", "hf_x"):
        assert leaked not in err


def test_validate_prints_the_config_masked_with_a_warning_per_key(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    cfg = load_config(REAL_CONFIG)
    path.write_text(to_yaml(cfg).replace("tracking_uri: null", "tracking_uri: http://u:pw@mlflow:5000"))
    assert "pw@" in path.read_text()
    assert cli.main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "# warning: tracking.mlflow.tracking_uri holds a password in its user part" in out
    assert "pw@" not in out and f"http://{MASK}@mlflow:5000" in out


def test_console_lines_records_and_the_recording_are_masked(capsys):
    url = "https://data.example.com/pairs.jsonl?token=abc"
    with console.Recording() as recording:
        print(f"[ray_dpo] reading {url}")
    console._print_own_lines({"lines": [f"[ray_dpo.feeder] reading {url}"], "is_err": False})
    record = logging.LogRecord("ray_dpo.data", logging.WARNING, __file__, 1, "cannot read %s", (url,), None)
    assert console.RedactRecords().filter(record)
    out = capsys.readouterr().out
    for text in (out, recording.text(), record.getMessage()):
        assert "token=abc" not in text and f"token={MASK}" in text


def test_mlflow_params_tags_and_texts_are_masked(tmp_path):
    from ray_dpo.tracking.mlflow_sink import MLflowRun

    run = MLflowRun.open(uri="sqlite:///" + str(tmp_path / "m.db"), experiment="e", run_name="r",
                         artifact_root=str(tmp_path / "art"))
    run.log_params({"data.train_files": f"['{PRESIGNED}']"})
    run.set_tags({"ray_dpo.model": "https://u:pw@host/m"})
    run.log_text(f"uri: {PRESIGNED}\n", "config/resolved.yaml")
    data = run.client.get_run(run.run_id).data
    assert "deadbeef" not in data.params["data.train_files"] and MASK in data.params["data.train_files"]
    assert data.tags["ray_dpo.model"] == f"https://{MASK}@host/m"
    text = open(run.client.download_artifacts(run.run_id, "config/resolved.yaml", str(tmp_path)), encoding="utf-8").read()
    assert "deadbeef" not in text and MASK in text


def test_validate_lists_the_code_a_config_runs(tmp_path, capsys, monkeypatch):
    """A judge module in the working directory, an installed one, one nowhere, and
    trust_remote_code: each named with its key and where it comes from."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_judge.py").write_text("def score(prompt, completion):\n    return 0.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    path = tmp_path / "c.yaml"
    cfg = load_config(REAL_CONFIG)
    text = to_yaml(cfg).replace("trust_remote_code: false", "trust_remote_code: true")
    path.write_text(text)
    overrides = ["--set", "online.judge.function=my_judge:score",
                 "--set", "eval.judge.function=ray_dpo.testing.assets:judge_score"]
    assert cli.main(["validate", str(path), *overrides]) == 0
    out = capsys.readouterr().out
    assert "# runs code: online.judge.function: score() of module my_judge (my_judge.py, from the working " \
           "directory" in out
    assert "# runs code: eval.judge.function: judge_score() of module ray_dpo.testing.assets (" in out
    assert "# runs code: model.trust_remote_code: the Python files that come with" in out
    # A module that is not there is a config problem before it is anything else.
    assert cli.main(["validate", str(path), "--set", "online.judge.function=nowhere_judge:score"]) == 2
    assert "online.judge.function" in capsys.readouterr().err


def test_a_config_error_quoting_a_url_reaches_the_console_masked(capsys):
    missing = "file:///nonexistent/pairs.jsonl?token=abc"
    code = cli.main(["validate", os.path.join(CONFIGS, "tiny-cpu.yaml"), "--set", f"data.train_files=['{missing}']"])
    out, err = capsys.readouterr()
    assert code == 2 and f"data.train_files[0]: glob 'file:///nonexistent/pairs.jsonl?token={MASK}'" in err
    assert "token=abc" not in out + err
