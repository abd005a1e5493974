"""Where a console script's flags come from: flag > PARAMHUB_* > (ps-worker: launcher variables) > --config > default.

Only parsing runs (``make_context``: options and their callbacks); no server or worker starts.
"""

from __future__ import annotations

import os
import pathlib

import click
import pytest
from click.testing import CliRunner

from paramhub.common.cliutil import CONFIG_SECTIONS
from paramhub.common.config import ServerConfig
from paramhub.common.security import Security, SecurityError
from paramhub.ps.cli import main as server_main
from paramhub.tools.ctl import main as ctl_main
from paramhub.tools.data import main as data_main
from paramhub.worker.cli import main as worker_main
from paramhub.worker.eval_cli import main as eval_main

pytestmark = pytest.mark.timeout(120)

LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "JOB_COMPLETION_INDEX")


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No PARAMHUB_* or launcher variable from the machine running the tests leaks into a parse."""
    for name in list(os.environ):
        if name.startswith("PARAMHUB_") or name in LAUNCHER_VARIABLES:
            monkeypatch.delenv(name)


def parse(command: click.Command, *args: str) -> dict:
    """The parameters the command would run with (its options parsed, nothing run)."""
    return command.make_context(command.name or "cmd", list(args)).params


def write_config(tmp_path, text: str) -> str:
    path = tmp_path / "cluster.toml"
    path.write_text(text)
    return str(path)


def run_cli(command: click.Command, *args: str):
    return CliRunner().invoke(command, list(args))


# -- precedence -------------------------------------------------------------------------------------


def test_server_option_flag_beats_env_beats_file_beats_default(tmp_path, monkeypatch):
    config = write_config(tmp_path, "[server]\nworkers = 3\n")
    assert parse(server_main)["workers"] == 1  # the default
    assert parse(server_main, "--config", config)["workers"] == 3
    monkeypatch.setenv("PARAMHUB_WORKERS", "4")
    assert parse(server_main, "--config", config)["workers"] == 4
    assert parse(server_main, "--config", config, "--workers", "5")["workers"] == 5


def test_worker_option_flag_beats_env_beats_file_beats_default(tmp_path, monkeypatch):
    config = write_config(tmp_path, "[worker]\nbatch-size = 16\n")
    assert parse(worker_main)["batch_size"] == 32
    assert parse(worker_main, "--config", config)["batch_size"] == 16
    monkeypatch.setenv("PARAMHUB_BATCH_SIZE", "8")
    assert parse(worker_main, "--config", config)["batch_size"] == 8
    assert parse(worker_main, "--config", config, "--batch-size", "4")["batch_size"] == 4


def test_common_table_applies_to_every_program_and_its_own_table_wins(tmp_path):
    config = write_config(tmp_path, """
[common]
server = "head:6000"    # ps-server has no --server: skipped there, not an error
token = "s3cret"
seed = 1
[server]
seed = 2
""")
    server = parse(server_main, "--config", config)
    assert (server["seed"], server["token"]) == (2, "s3cret")
    worker = parse(worker_main, "--config", config)
    assert (worker["seed"], worker["token"], worker["server"]) == (1, "s3cret", "head:6000")
    evaluator = parse(eval_main, "--config", config, "--data", "synthetic")
    assert (evaluator["server"], evaluator["token"]) == ("head:6000", "s3cret")


def test_file_keys_take_dashes_or_underscores_and_toml_types(tmp_path):
    config = write_config(tmp_path, """
[server]
num-classes = 10
checkpoint_dir = "ckpt"
resume = true          # a flag
lr = 1                 # an integer for a float option
staleness-damping = false
mode = "async"
""")
    params = parse(server_main, "--config", config)
    assert params["num_classes"] == 10 and params["checkpoint_dir"] == "ckpt" and params["resume"] is True
    assert params["lr"] == 1.0 and isinstance(params["lr"], float)
    assert params["staleness_damping"] is False and params["mode"] == "async"


def test_the_config_file_itself_can_come_from_paramhub_config(tmp_path, monkeypatch):
    monkeypatch.setenv("PARAMHUB_CONFIG", write_config(tmp_path, "[worker]\nepochs = 2\n"))
    assert parse(worker_main)["epochs"] == 2


def test_ps_ctl_and_ps_data_subcommands_read_paramhub_flag_and_the_file(tmp_path, monkeypatch):
    config = write_config(tmp_path, """
[common]
token = "from-file"
[ctl]
timeout = 7          # health and status have it; export does not, and takes no offence
[data]
seed = 5
""")
    status = ctl_main.commands["status"]
    assert parse(status, "--config", config, "head:1")["timeout"] == 7
    assert parse(status, "--config", config, "head:1")["token"] == "from-file"
    assert parse(ctl_main.commands["export"], "--config", config, "--checkpoint", "c", "--out", "m.pt")["out"] == "m.pt"
    monkeypatch.setenv("PARAMHUB_TOKEN", "from-env")
    assert parse(status, "--config", config, "head:1")["token"] == "from-env"
    split = data_main.commands["split"]
    assert parse(split, "--config", config, "--input", "in", "--shards", "2", "--out", "o")["seed"] == 5
    monkeypatch.setenv("PARAMHUB_INPUT", "env-in")
    monkeypatch.setenv("PARAMHUB_SHARDS", "3")
    params = parse(split, "--out", "o")
    assert (str(params["input_dir"]), params["num_shards"]) == ("env-in", 3)


def all_commands():
    """(program, command, its parent group or None) for every console script and subcommand."""
    for program, command in (("ps-server", server_main), ("ps-worker", worker_main), ("ps-eval", eval_main),
                             ("ps-data", data_main), ("ps-ctl", ctl_main)):
        if isinstance(command, click.Group):
            for name, sub in command.commands.items():
                yield f"{program} {name}", sub, command
        else:
            yield program, command, None


FLAGLESS = {"ps-data verify"}  # commands that take only arguments


@pytest.mark.parametrize("program, command, group", list(all_commands()), ids=[c[0] for c in all_commands()])
def test_every_flag_of_every_command_reads_paramhub_flag_and_a_config_file(program, command, group, monkeypatch):
    """PARAMHUB_<FLAG> (the long flag's name, not click's parameter name) reaches each option; --config exists."""
    parent = click.Context(group, info_name=program.split()[0], **group.context_settings) if group else None
    ctx = click.Context(command, info_name=program.split()[-1], parent=parent, **command.context_settings)
    options = [p for p in command.params if isinstance(p, click.Option)]
    if program in FLAGLESS:  # named, so a command that loses all its flags fails instead of being skipped
        assert not any(o.name != "config" for o in options), f"{program} has flags now: take it off FLAGLESS"
        return
    assert "--config" in {opt for o in options for opt in o.opts}, f"{program} has no --config"
    for option in options:
        flag = max(option.opts, key=len)[2:]
        variable = "PARAMHUB_" + flag.upper().replace("-", "_")
        monkeypatch.setenv(variable, "sentinel")
        assert option.resolve_envvar_value(ctx) == "sentinel", f"{program} {flag} does not read {variable}"
        monkeypatch.delenv(variable)


# -- torchrun and Kubernetes ------------------------------------------------------------------------


def test_torchrun_variables_give_shard_num_shards_and_server(monkeypatch):
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.5")
    monkeypatch.setenv("MASTER_PORT", "29500")
    params = parse(worker_main)
    assert (params["shard"], params["num_shards"], params["server"]) == (2, 4, "10.0.0.5:29500")


def test_master_addr_alone_uses_the_default_port_and_ipv6_gets_brackets(monkeypatch):
    monkeypatch.setenv("MASTER_ADDR", "head")
    assert parse(worker_main)["server"] == "head:50051"
    monkeypatch.setenv("MASTER_ADDR", "fd00::5")
    monkeypatch.setenv("MASTER_PORT", "7000")
    assert parse(worker_main)["server"] == "[fd00::5]:7000"


def test_job_completion_index_is_the_shard(monkeypatch):
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    assert parse(worker_main)["shard"] == 3
    monkeypatch.setenv("RANK", "1")  # torchrun inside a pod: one process per rank, RANK is the finer
    assert parse(worker_main)["shard"] == 1


def test_launcher_variables_sit_between_paramhub_variables_and_the_file(tmp_path, monkeypatch):
    config = write_config(tmp_path, '[worker]\nshard = 1\nnum-shards = 8\nserver = "file:1"\n')
    assert parse(worker_main, "--config", config)["shard"] == 1
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("MASTER_ADDR", "master")
    params = parse(worker_main, "--config", config)
    assert (params["shard"], params["num_shards"], params["server"]) == (2, 4, "master:50051")
    monkeypatch.setenv("PARAMHUB_SHARD", "3")
    monkeypatch.setenv("PARAMHUB_SERVER", "env:2")
    params = parse(worker_main, "--config", config)
    assert (params["shard"], params["server"]) == (3, "env:2")
    params = parse(worker_main, "--config", config, "--shard", "0", "--server", "flag:3")
    assert (params["shard"], params["server"]) == (0, "flag:3")


def test_a_bad_launcher_value_is_a_usage_error(monkeypatch):
    monkeypatch.setenv("RANK", "-1")
    result = run_cli(worker_main)
    assert result.exit_code == 2 and "--shard" in result.output


def test_worker_help_documents_the_precedence():
    text = run_cli(worker_main, "--help").output
    for word in ("PARAMHUB_", "RANK", "JOB_COMPLETION_INDEX", "WORLD_SIZE", "MASTER_ADDR", "--config"):
        assert word in text


# -- bad files --------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, words", [
    ("[server]\nworkerz = 3\n", ["'workerz'", "[server]", "ps-server has no flag --workerz"]),
    ("[common]\nbogus-key = 1\n", ["'bogus-key'", "[common]", "no paramhub program"]),
    ("[servers]\nworkers = 3\n", ["[servers]", "unknown table"]),
    ("workers = 3\n", ["'workers'", "outside any table"]),
    ("[server]\nconfig = 'other.toml'\n", ["cannot name another"]),
    ("[server]\nworkers = 2\nworkers = 3\n", ["not valid TOML"]),
    ("[server]\nnum-classes = 2\nnum_classes = 3\n", ["twice"]),
    ("[server]\nhost = ['a', 'b']\n", ["host", "string, a number or a boolean"]),
    ("[server\nworkers = 3\n", ["not valid TOML", "line 1"]),
], ids=["unknown-key", "unknown-common-key", "unknown-table", "no-table", "config-in-config", "duplicate",
        "both-spellings", "a-list", "broken-toml"])
def test_a_bad_config_file_is_a_clear_usage_error(tmp_path, text, words):
    config = write_config(tmp_path, text)
    result = run_cli(server_main, "--config", config)
    assert result.exit_code == 2, result.output
    assert config in result.output and "--config" in result.output
    for word in words:
        assert word in result.output


def test_a_missing_config_file_is_a_clear_usage_error(tmp_path):
    missing = tmp_path / "nope.toml"
    result = run_cli(worker_main, "--config", str(missing))
    assert result.exit_code == 2
    assert f"cannot read {missing}" in result.output


def test_a_value_of_the_wrong_type_names_the_option(tmp_path):
    result = run_cli(server_main, "--config", write_config(tmp_path, "[server]\nworkers = 'many'\n"))
    assert result.exit_code == 2 and "--workers" in result.output


def test_each_section_names_an_importable_console_script():
    for program, target in CONFIG_SECTIONS.values():
        module, _, attribute = target.partition(":")
        assert isinstance(getattr(__import__(module, fromlist=[attribute]), attribute), click.Command), program


def test_the_readme_example_parses_for_each_program(tmp_path):
    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("## Configuration"):]
    example = section[section.index("```toml\n") + len("```toml\n"):section.index("```\n", section.index("```toml"))]
    config = write_config(tmp_path, example)
    assert parse(server_main, "--config", config)["staleness"] == 4
    assert parse(worker_main, "--config", config, "--shard", "1")["batch_size"] == 64
    assert parse(eval_main, "--config", config)["every"] == 300


@pytest.mark.parametrize("fields, flag", [
    (dict(workers=2, backup_workers=2), "--backup-workers"),
    (dict(lr_schedule="cosine"), "--lr-schedule cosine needs --max-steps"),
    (dict(resume=True), "--resume needs --checkpoint-dir"),
    (dict(mode="sync", staleness=3), "--staleness only applies to --mode async"),
    (dict(new_head=True), "--new-head needs --init-from"),
    (dict(partition=(0, 2), eval_data="val", eval_every=5), "--eval-data: a partition"),
    (dict(eval_data="val"), "--eval-data and --eval-every go together"),
    (dict(eval_precise_bn_data="shards"), "--eval-precise-bn-data needs --eval-data"),
])
def test_a_contradictory_server_config_is_refused_however_it_is_built(fields, flag):
    """The checks live in the config type, not only in ps-server's CLI."""
    with pytest.raises(ValueError, match=flag):
        ServerConfig(**fields)
    assert ServerConfig(**{"workers": 3, "mode": "async", "staleness": 3, "max_steps": 10}) is not None  # control


def test_an_exposed_listener_is_refused_by_the_config_itself():
    """ps-server's listen-address check lives in ServerConfig, so a server built in Python gets it too."""
    with pytest.raises(SecurityError, match="refusing to listen on 0.0.0.0"):
        ServerConfig(host="0.0.0.0")
    assert ServerConfig(host="0.0.0.0", insecure=True).host == "0.0.0.0"
    assert ServerConfig(host="0.0.0.0", security=Security(token="t")).host == "0.0.0.0"
    assert ServerConfig(host="127.0.0.1").host == "127.0.0.1"
