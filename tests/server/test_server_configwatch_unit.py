"""Live configuration: parsing, merging, the file watcher and the bearer check (no model)."""

import asyncio

import pytest

from baton_sidecar.config import PolicyConfig, RouterConfig
from baton_sidecar.server.configwatch import (ConfigManager, FileWatcher, LiveConfig, check_bearer,
                                              deep_merge, merge, parse_document, read_admin_token)

BASE = LiveConfig(PolicyConfig(), RouterConfig(incumbent_url="http://127.0.0.1:9", baton_weight=10))


def test_merge_keeps_unmentioned_keys():
    new = merge(BASE, {"router": {"baton_weight": 30}, "policy": {"limits": {"max_queue": 7}}})
    assert new.router.baton_weight == 30 and new.router.incumbent_url == "http://127.0.0.1:9"
    assert new.policy.limits.max_queue == 7 and new.policy.limits.max_batch_size == 32


def test_sla_classes_are_replaced_whole():
    new = merge(BASE, {"policy": {"sla_classes": {"gold": {"priority": 0, "ttft_ms": 50}}}})
    assert set(new.policy.sla_classes) == {"gold"}
    assert deep_merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}


@pytest.mark.parametrize("doc, field", [
    ({"router": {"baton_weight": 101}}, "baton_weight"),
    ({"router": {"incumbent_url": "ftp://x"}}, "incumbent_url"),
    ({"router": {"nope": 1}}, "router.nope"),
    ({"router": {"fallback_to_baton": "yes"}}, "router.fallback_to_baton"),
    ({"router": {"incumbent_timeout_s": 0}}, "router.incumbent_timeout_s"),
    ({"policy": {"limits": {"max_queue": 0}}}, "limits.max_queue"),
    ({"policy": {"preemption": {"mode": "sometimes"}}}, "preemption.mode"),
    ({"policy": {"bogus": 1}}, "bogus"),
])
def test_merge_refuses_with_the_field_name(doc, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        merge(BASE, doc)


@pytest.mark.parametrize("text, match", [
    ("[1, 2]", "mapping"), ("extra: 1", "extra"), ("router: 5", "router"), ("a: [", "YAML"),
])
def test_parse_document_refusals(text, match):
    with pytest.raises(ValueError, match=match):
        parse_document(text)


def test_parse_document_accepts_json_yaml_and_empty():
    assert parse_document('{"router": {"baton_weight": 5}}') == {"router": {"baton_weight": 5}}
    assert parse_document("router:\n  baton_weight: 5\n") == {"router": {"baton_weight": 5}}
    assert parse_document("") == {} and parse_document("policy:\n") == {}


def manager():
    applied = {"policy": [], "router": [], "results": []}
    m = ConfigManager(BASE, applied["policy"].append, applied["router"].append,
                      lambda source, ok: applied["results"].append((source, ok)))
    return m, applied


def test_manager_file_recomputes_from_startup_and_patch_from_current():
    m, applied = manager()
    m.apply_file_text("router: {baton_weight: 40}\npolicy: {aging_s: 5}\n")
    assert m.current.router.baton_weight == 40 and m.current.policy.aging_s == 5
    m.apply_file_text("router: {baton_weight: 50}\n")  # aging_s reverts: no longer in the file
    assert m.current.policy.aging_s == 30 and m.current.router.baton_weight == 50
    m.apply_patch({"router": {"fallback_to_baton": True}})
    assert m.current.router.baton_weight == 50 and m.current.router.fallback_to_baton
    assert [p.aging_s for p in applied["policy"]] == [5, 30]
    assert len(applied["router"]) == 3
    with pytest.raises(ValueError):
        m.apply_patch({"router": {"baton_weight": -1}})
    assert m.current.router.baton_weight == 50  # refused: previous kept
    assert applied["results"][-1] == ("admin", False)


def test_file_watcher_applies_changes_and_survives_bad_files(tmp_path):
    path = tmp_path / "baton.yaml"
    path.write_text("router: {baton_weight: 20}\n")
    m, applied = manager()
    w = FileWatcher(str(path), m, interval_s=0.01)
    w.load_initial()
    assert m.current.router.baton_weight == 20

    async def scenario():
        assert not await w.check()  # unchanged
        path.write_text("router: {baton_weight: 120}\n")
        assert not await w.check()  # refused, previous kept
        assert m.current.router.baton_weight == 20
        path.write_text("router: {baton_weight: 70}\n")
        assert await w.check()
        path.unlink()
        assert not await w.check()  # mid-swap: keep what is in force
        w.start()
        path.write_text("router: {baton_weight: 80}\n")
        for _ in range(200):
            if m.current.router.baton_weight == 80:
                break
            await asyncio.sleep(0.01)
        await w.stop()

    asyncio.run(scenario())
    assert m.current.router.baton_weight == 80
    assert ("file", False) in applied["results"]


def test_bearer_check_and_token_sources(tmp_path):
    assert check_bearer("Bearer s3cret", "s3cret")
    assert not check_bearer("Bearer s3cre", "s3cret")
    assert not check_bearer("s3cret", "s3cret") and not check_bearer(None, "s3cret")
    f = tmp_path / "token"
    f.write_text("from-file\n")
    assert read_admin_token("from-env", str(f)) == "from-file"
    assert read_admin_token("from-env", None) == "from-env"
    assert read_admin_token("  ", None) is None and read_admin_token(None, None) is None


def test_policy_file_watcher_reloads_the_policy_section(tmp_path):
    """``--policy FILE`` holds only the policy section and is hot-reloaded like the config file."""
    path = tmp_path / "policy.yaml"
    path.write_text("preemption: {mode: swap}\nlimits: {max_batch_size: 4}\n")
    m, applied = manager()
    w = FileWatcher(str(path), m, interval_s=0.01, section="policy")
    w.load_initial()
    assert m.current.policy.limits.max_batch_size == 4 and applied["policy"][-1].preemption.mode == "swap"

    async def scenario():
        path.write_text("preemption: {mode: recompute}\nlimits: {max_batch_size: 6}\n")
        assert await w.check()
        path.write_text("preemption: {mode: sometimes}\n")
        assert not await w.check()  # refused: the previous policy stays in force

    asyncio.run(scenario())
    assert m.current.policy.preemption.mode == "recompute" and m.current.policy.limits.max_batch_size == 6
    assert m.current.router == BASE.router
