"""Opening a registry: reads create nothing, and a bad URL, server, login or database is one clear line, fast."""

from __future__ import annotations

import json
import sys
import time

import pytest
from conftest import PICO
from typer.testing import CliRunner

from adaptkit.cli import app
from adaptkit.errors import NotFoundError, RegistryError
from adaptkit.registry import Registry
from adaptkit.registry.db import normalise_url

runner = CliRunner()


def _fails(*args: str, message: str) -> str:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output
    return result.output


def test_reads_create_no_registry(tmp_path):
    reg = Registry(tmp_path / "registry.db")
    assert reg.tasks() == [] and not reg.exists
    reg.check_classes("any", ["a", "b"])
    with pytest.raises(NotFoundError, match=f"no task 'demo': there is no registry at {tmp_path}/registry.db yet"):
        reg.get_version("demo")
    with pytest.raises(NotFoundError, match="no registry at"):
        reg.remove("demo")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("args", [["show", "demo"], ["compare"], ["default", "demo@1"], ["export", "demo", "x"],
                                  ["train", "--dataset", "folder:/no/such/dir", "--backbone", PICO, "--no-pretrained"]])
def test_a_failed_or_read_only_command_leaves_nothing(tmp_path, args):
    result = runner.invoke(app, [*args, "--registry", str(tmp_path / "registry.db")])
    assert result.exit_code in (0, 1) and "Traceback" not in result.output
    assert list(tmp_path.iterdir()) == []


def test_list_without_a_registry_says_so(tmp_path):
    result = runner.invoke(app, ["list", "--registry", str(tmp_path / "registry.db")])
    assert result.exit_code == 0 and f"no registry at {tmp_path / 'registry.db'} yet" in result.output
    assert list(tmp_path.iterdir()) == []


def test_urls_for_postgresql_use_psycopg_3(tmp_path):
    assert normalise_url("postgresql://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_url("postgres://u@h:5433/db") == "postgresql+psycopg://u@h:5433/db"
    assert normalise_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert normalise_url(tmp_path / "r.db") == f"sqlite:///{tmp_path / 'r.db'}"


def test_postgresql_without_its_driver_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if psycopg were not installed
    with pytest.raises(RegistryError, match=r'needs the psycopg driver.*pip install "adaptkit\[postgres\]"'):
        Registry("postgresql://someone@db.example/registry")


def test_unknown_database_kinds_are_named():
    with pytest.raises(RegistryError, match="unknown database 'oracle2'"):
        Registry("oracle2://x/y")


def test_an_unreachable_server_is_one_line_within_seconds(pg_server):
    closed = pg_server.port + 1 if pg_server.port < 65535 else pg_server.port - 1
    start = time.monotonic()
    out = _fails("list", "--registry", f"postgresql://postgres:pw@127.0.0.1:{closed}/x",
                 message="cannot reach the database server of postgresql+psycopg://postgres:***@127.0.0.1")
    assert time.monotonic() - start < 10 and "pw@" not in out


def test_a_wrong_password_is_named(pg_server):
    _fails("list", "--registry", pg_server.url("postgres", password="wrong"),
           message="refused the login for postgresql+psycopg://postgres:***@")


def test_a_missing_database_is_named(pg_server):
    _fails("show", "demo", "--registry", pg_server.url("nosuchdb"),
           message="there is no database 'nosuchdb' on the server")


def test_a_postgresql_registry_is_made_by_its_first_write_only(pg_server, tmp_path):
    url = pg_server.url(pg_server.create_database())
    reg = Registry(url, adapter_dir=tmp_path / "adapters")
    assert reg.tasks() == [] and not reg.exists
    with pytest.raises(NotFoundError, match="no registry at postgresql"):
        reg.get_version("demo")
    with reg.engine.connect() as conn:
        assert conn.exec_driver_sql("SELECT count(*) FROM pg_tables WHERE schemaname = 'public'").scalar() == 0


def test_every_command_works_on_postgresql(pg_server, tmp_path, monkeypatch, cifar_mini):
    url = pg_server.url(pg_server.create_database()).replace("+psycopg", "")  # the plain URL a user writes
    monkeypatch.setenv("ADAPTKIT_ADAPTER_DIR", str(tmp_path / "adapters"))

    def ok(*args: str) -> str:
        result = runner.invoke(app, [*map(str, args), "--registry", url])
        assert result.exit_code == 0, result.output
        return result.output

    quick = ["--backbone", PICO, "--no-pretrained", "--epochs", "1", "--batch-size", "32", "--limit-train", "32",
             "--limit-eval", "20", "--method", "linear"]
    for seed in ("1", "2"):
        assert "trained mini@" in ok("train", "--dataset", f"folder:{cifar_mini}", "--task", "mini", *quick,
                                     "--seed", seed)
    assert "mini" in ok("list") and "v2" in ok("show", "mini")
    assert "mini@1 is now the default" in ok("default", "mini@1")
    assert {r["version"]: r["default"] for r in json.loads(ok("compare", "--json"))["rows"]} == {1: True, 2: False}
    image = cifar_mini / "test" / "cat" / "0000.jpg"
    assert len(json.loads(ok("predict", "mini@2", image, "--topk", "2", "--json"))[0]["predictions"]) == 2
    ok("export", "mini@2", tmp_path / "m.safetensors")
    assert "imported" in ok("import", tmp_path / "m.safetensors", "--task", "copy")
    assert "removed mini@1, mini@2" in ok("remove", "mini", "--yes")
    reg = Registry(url)
    assert [t.name for t in reg.tasks()] == ["copy"]
    assert sorted(p.name for p in (tmp_path / "adapters").rglob("*.safetensors")) == \
        [reg.path_of(reg.get_version("copy")).name]


def test_train_into_a_missing_folder_stops_before_training(tmp_path):
    start = time.monotonic()
    _fails("train", "--dataset", "digits", "--backbone", PICO, "--no-pretrained", "--epochs", "50",
           "--registry", tmp_path / "nofolder" / "registry.db",
           message=f"registry folder {tmp_path}/nofolder does not exist")
    assert time.monotonic() - start < 60 and list(tmp_path.iterdir()) == []
