"""A model that cannot be served: the process exits non-zero within seconds, its last log line the cause.

In Kubernetes that is a crash loop whose log names the problem, not a pod that stays
unready forever. Each kind of failure starts from a valid tiny model directory and breaks
one thing, then runs the real ``baton-sidecar serve`` on it.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from archs import save_family
from server_helpers import REPO, serve_command
from tiny import tiny_tokenizer

EXIT_WITHIN_S = 30


def _config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config | changes))


def _recurrent(directory):
    """A state-space model: transformers runs it, but it keeps no attention K/V cache."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "mamba", vocab_size=96, hidden_size=32, num_hidden_layers=1, state_size=4))
    for path in directory.iterdir():
        path.unlink()
    model.save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)


def _truncate_weights(directory):
    weights = directory / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])


# failure kind -> (how to break a valid directory, what the last line must say)
BREAKAGES = {
    "missing directory": (lambda d: d.rename(d.with_name("moved")), "does not exist"),
    "broken config": (lambda d: (d / "config.json").write_text('{"model_type": "llama", '),
                      "config.json is not valid JSON: Expecting property name"),
    "unknown architecture": (lambda d: _config(d, model_type="frobnicator"),
                             "model_type 'frobnicator' is not an architecture transformers"),
    "not a causal LM": (lambda d: _config(d, model_type="t5"), "'t5' is not a causal language model"),
    "bidirectional": (lambda d: _config(d, model_type="bert", hidden_size=32, num_attention_heads=2),
                      "its attention is not causal"),
    "unsupported feature": (_recurrent, "Baton cannot serve"),
    "corrupt weights": (_truncate_weights, "model.safetensors is not a readable safetensors file"),
    "no tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "no usable tokenizer"),
}


@pytest.mark.parametrize("kind", sorted(BREAKAGES))
def test_a_broken_model_exits_nonzero_naming_the_cause(tmp_path, kind):
    directory = save_family("llama", tmp_path / "model")
    breakage, cause = BREAKAGES[kind]
    breakage(directory)
    started = time.monotonic()
    done = subprocess.run([*serve_command(), "--host", "127.0.0.1", "--port", "0", "--model", str(directory)],
                          cwd=REPO, capture_output=True, text=True, timeout=EXIT_WITHIN_S)
    elapsed = time.monotonic() - started
    lines = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode != 0, lines[-5:]
    assert elapsed < EXIT_WITHIN_S
    assert cause in lines[-1], lines[-5:]
    assert "Traceback" not in done.stderr, "a known failure is one line, not a traceback"
