"""Schema migrations: a 0.1.0 registry is upgraded in place, a newer one is refused, migrations equal the models."""

from __future__ import annotations

import multiprocessing
import shutil
import sqlite3
from pathlib import Path

import pytest
import torch
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import create_engine, text

from adaptkit.errors import RegistryError
from adaptkit.inference import Predictor
from adaptkit.registry import Base, Registry, db

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def v01(tmp_path) -> Path:
    """A copy of the registry that adaptkit 0.1.0 made (tests/fixtures/make_registry_v0_1.py), adapters beside it."""
    shutil.copy(FIXTURES / "registry-v0.1.db", tmp_path / "registry.db")
    shutil.copytree(FIXTURES / "adapters", tmp_path / "adapters")
    return tmp_path / "registry.db"


def _revision(url: str) -> str | None:
    with create_engine(url).connect() as conn:
        return db.schema_revision(conn)


def test_head_constant_is_the_newest_script():
    cfg = Config()
    cfg.set_main_option("script_location", str(db.MIGRATIONS))
    assert ScriptDirectory.from_config(cfg).get_current_head() == db.SCHEMA_HEAD


def test_a_v01_registry_is_upgraded_in_place_and_still_predicts(v01):
    assert _revision(f"sqlite:///{v01}") == "v0.1"
    reg = Registry(v01)
    tasks = reg.tasks()  # opening it upgrades it
    assert _revision(reg.url) == db.SCHEMA_HEAD
    assert [(v.ref, v.method, v.is_default, v.bytes) for v in tasks[0].versions] == \
        [("mini@1", "linear", True, 3664), ("mini@2", "adapter", False, 14480)]
    assert reg.path_of(reg.get_version("mini@2")).stat().st_size == 14480
    image = torch.rand(3, 32, 32)
    predictions = Predictor(reg, device="cpu").predict([image], "mini@2", topk=3)
    assert len(predictions[0]) == 3 and predictions[0][0].label in tasks[0].classes
    assert reg.add_version(_meta_of(reg, "mini@1"), _state_of(reg, "mini@1")).version == 3  # writable after


def _meta_of(reg: Registry, ref: str):
    from adaptkit.artifacts import load_adapter

    return load_adapter(reg.path_of(reg.get_version(ref)))[1]


def _state_of(reg: Registry, ref: str):
    from adaptkit.artifacts import load_adapter

    return load_adapter(reg.path_of(reg.get_version(ref)))[0]


def test_migrations_build_exactly_the_models(registry_url, tmp_path):
    reg = Registry(registry_url, adapter_dir=tmp_path / "adapters")
    assert not reg.exists
    with reg.transaction():  # the first write creates the registry through the migrations
        pass
    with reg.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    assert _revision(registry_url) == db.SCHEMA_HEAD


def test_0002_lets_postgresql_hold_files_past_2_gb(pg_server):
    """A 0.1.0 registry on PostgreSQL (the baseline, no alembic_version) refuses 3 GB in `bytes` until upgraded."""
    url = pg_server.url(pg_server.create_database())
    engine = create_engine(url)
    with engine.begin() as conn:
        cfg = Config()
        cfg.set_main_option("script_location", str(db.MIGRATIONS))
        cfg.attributes["connection"] = conn
        from alembic import command

        command.upgrade(cfg, "0001")
        conn.execute(text("DROP TABLE alembic_version"))
    insert = text("INSERT INTO adapter_versions (task_id, version, backbone_id, method, config, trainable_params, "
                  "file, sha256, bytes, metrics, train, status, is_default, created_at) VALUES (1, 1, 1, 'full', "
                  "'{}', 3000000000, 'x', 'y', 3000000000, '{}', '{}', 'ready', true, now())")
    setup = ["INSERT INTO backbones VALUES (1, 'b', 'random', 'f', 3000000000, 4, '{}', now())",
             "INSERT INTO tasks VALUES (1, 't', 'd', '[\"a\"]', now())"]
    with pytest.raises(Exception, match="out of range"), engine.begin() as conn:
        conn.execute(text(setup[0]))
    assert _revision(url) == "v0.1"
    Registry(url).tasks()
    assert _revision(url) == db.SCHEMA_HEAD
    with engine.begin() as conn:
        for statement in setup:
            conn.execute(text(statement))
        conn.execute(insert)
    assert Registry(url).get_version("t", allow_broken=True).bytes == 3_000_000_000  # (a made-up file and hash)


def test_a_newer_registry_says_upgrade_adaptkit(registry_url, tmp_path):
    reg = Registry(registry_url, adapter_dir=tmp_path / "adapters")
    with reg.transaction():
        pass
    with create_engine(registry_url).begin() as conn:
        conn.execute(text("UPDATE alembic_version SET version_num = '0099'"))
    with pytest.raises(RegistryError, match=r"made by a newer adaptkit \(schema 0099; this adaptkit knows up to "
                                            rf"{db.SCHEMA_HEAD}\): upgrade adaptkit"):
        Registry(registry_url).tasks()


def test_another_programs_database_is_not_taken_for_a_registry(tmp_path):
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as conn:
        conn.execute("CREATE TABLE invoices (id INTEGER)")
    for action in (lambda r: r.tasks(), lambda r: r.transaction().__enter__()):
        with pytest.raises(RegistryError, match=r"another program's database, not an adaptkit registry \(tables "
                                                r"invoices\)"):
            action(Registry(other))
    with sqlite3.connect(other) as conn:
        assert [r[0] for r in conn.execute("SELECT name FROM sqlite_master")] == ["invoices"]  # left as it was


def _open(path: str) -> None:
    Registry(path).tasks()


def test_processes_opening_an_old_registry_at_once_upgrade_it_once(v01):
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_open, args=(str(v01),)) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    with sqlite3.connect(v01) as conn:
        assert conn.execute("SELECT version_num FROM alembic_version").fetchall() == [(db.SCHEMA_HEAD,)]
        assert conn.execute("SELECT count(*) FROM adapter_versions").fetchone() == (2,)
