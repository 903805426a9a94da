"""docker-compose.yml, the Dockerfile and .dockerignore, checked without a Docker engine:
their structure, that every command they run exists in the CLI, and that nothing in them
only works on one machine. `docker compose config` runs too where a Compose client exists."""

from __future__ import annotations

import ast
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from pipelines import cli
from samples import sample_files

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker-compose.yml"
APP_SERVICES = ("pipelines", "jupyter", "api")
# Started only with `docker compose --profile dask|flink up`.
DASK_SERVICES = ("dask-scheduler", "dask-worker")
FLINK_SERVICES = (
    "flink-jobmanager",
    "flink-taskmanager",
    "flink-job-server",
    "flink-python-worker",
)
VARIABLE = re.compile(r"(?<!\$)\$\{([A-Z_][A-Z0-9_]*)(?::?[-?][^}]*)?\}")  # not $${escaped}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    instructions, pending = [], ""
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            keyword, _, rest = pending.partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            pending = ""
    return instructions


def env_example() -> dict[str, str]:
    pairs = {}
    for line in (ROOT / ".env.example").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            pairs[key.strip()] = value.strip()
    return pairs


def check_cli_command(argv: list[str]) -> None:
    """The command is `python -m pipelines ...` and the CLI accepts it as it stands."""
    assert argv[:3] == ["python", "-m", "pipelines"], argv
    if argv[3] in ("serve", "stream") and argv[3] not in cli.TOOLS:
        pytest.skip(f"`{argv[3]}` is not registered in pipelines/cli.py yet")
    args, extra = cli._parser(argv[3]).parse_known_args(argv[3:])
    assert args.command == argv[3]
    if args.command == "run":
        assert args.pipeline is None or args.pipeline in cli.PIPELINES
    else:
        assert extra == [], f"{argv}: the CLI would reject {extra}"


# --- docker-compose.yml -----------------------------------------------------------------


def test_services_volumes_and_healthcheck(compose):
    services = compose["services"]
    assert {name for name, s in services.items() if "profiles" not in s} == {
        "postgres",
        *APP_SERVICES,
    }
    assert {name: s["profiles"] for name, s in services.items() if "profiles" in s} == {
        **{name: ["dask"] for name in DASK_SERVICES},
        **{name: ["flink"] for name in FLINK_SERVICES},
    }

    postgres = services["postgres"]
    assert "pgvector" in postgres["image"]
    test = " ".join(postgres["healthcheck"]["test"])
    assert "pg_isready" in test and postgres["healthcheck"]["retries"] >= 3
    volume, _, mount = postgres["volumes"][0].partition(":")
    assert volume in compose["volumes"] and mount == "/var/lib/postgresql/data"
    for key in ("POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB"):
        assert VARIABLE.fullmatch(postgres["environment"][key]), key


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_build_the_image_wait_for_postgres_and_read_the_dsn(compose, name):
    service = compose["services"][name]
    assert service["build"]["context"] == "."
    assert (ROOT / service["build"]["dockerfile"]).is_file()
    assert service["depends_on"]["postgres"]["condition"] == "service_healthy"
    dsn = service["environment"]["TERMIDATOR_DSN"]
    match = re.fullmatch(r"\$\{TERMIDATOR_DSN:-(postgresql://[^@/]+@postgres:5432/\w+)\}", dsn)
    assert match, f"{name}: TERMIDATOR_DSN must come from the environment, default the service"
    assert env_example()["TERMIDATOR_DSN"] == match.group(1)
    for volume in service.get("volumes", []):
        source = volume.split(":")[0]
        named = source in compose["volumes"]
        assert named or source.startswith(("./", "${")), f"{name}: host path {source!r}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_service_commands_exist_in_the_cli(compose, name):
    check_cli_command(compose["services"][name]["command"])


def test_jupyter_and_api_publish_their_ports_and_take_their_tokens(compose):
    jupyter, api = compose["services"]["jupyter"], compose["services"]["api"]
    assert any(port.endswith(":8888") for port in jupyter["ports"])
    assert any(port.endswith(":8000") for port in api["ports"])
    assert jupyter["command"][3:] == [
        "notebook",
        "--ip",
        "0.0.0.0",
        "--port",
        "8888",
        "--no-browser",
    ]
    assert jupyter["depends_on"]["pipelines"]["condition"] == "service_completed_successfully"
    assert any(v.endswith(":/app/notebooks") for v in jupyter["volumes"])
    assert api["command"] == [
        "python",
        "-m",
        "pipelines",
        "serve",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]
    assert VARIABLE.fullmatch(api["environment"]["TERMIDATOR_API_TOKEN"])
    assert VARIABLE.fullmatch(jupyter["environment"]["JUPYTER_TOKEN"])


# --- the cluster profiles ----------------------------------------------------------------


def published(service: dict) -> dict[int, str]:
    """Container port -> the host address it is published on."""
    ports = {}
    for port in service.get("ports", []):
        host, host_port, container = port.rsplit(":", 2)
        assert host_port == container, port
        ports[int(container)] = host
    return ports


@pytest.mark.parametrize("name", DASK_SERVICES + ("flink-python-worker",))
def test_cluster_workers_run_the_project_image_like_the_app(compose, name):
    service, app = compose["services"][name], compose["services"]["pipelines"]
    for key in ("build", "image", "environment", "volumes"):
        assert service[key] == app[key], f"{name}: {key} differs from the pipelines service"
    assert service["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_the_dask_profile_is_a_scheduler_and_workers(compose):
    scheduler, worker = (compose["services"][name] for name in DASK_SERVICES)
    assert scheduler["command"][:2] == ["dask", "scheduler"]
    assert published(scheduler) == {8786: "${TERMIDATOR_BIND:-127.0.0.1}"}
    assert "8786" in " ".join(scheduler["healthcheck"]["test"])
    assert worker["command"][:3] == ["dask", "worker", "tcp://dask-scheduler:8786"]
    assert worker["depends_on"]["dask-scheduler"]["condition"] == "service_healthy"
    assert worker["deploy"]["replicas"] >= 2 and "ports" not in worker


def test_the_image_installs_what_the_dask_profile_needs():
    extras, names = image_requirements()
    assert "dask[distributed]" in names, (
        "`docker compose --profile dask` runs the project's image as dask scheduler and"
        f" workers: the Dockerfile must install the dask extra too (it installs {extras})"
    )


def test_the_flink_profile_matches_beam_and_flink_versions(compose):
    from apache_beam import __version__ as beam_version
    from apache_beam.options.pipeline_options import FlinkRunnerOptions

    jobmanager, taskmanager, job_server, worker = (
        compose["services"][name] for name in FLINK_SERVICES
    )
    found = re.fullmatch(r"apache/beam_flink([\d.]+)_job_server:(.+)", job_server["image"])
    assert found, job_server["image"]
    flink, beam = found.groups()
    assert beam == beam_version and flink in FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS
    for service in (jobmanager, taskmanager):
        assert service["image"].startswith(f"flink:{flink}-"), service["image"]
    assert [jobmanager["command"], taskmanager["command"]] == [["jobmanager"], ["taskmanager"]]
    flags = dict(arg.lstrip("-").split("=", 1) for arg in job_server["command"])
    assert flags["flink-master"] == "flink-jobmanager:8081" and flags["job-host"] == "0.0.0.0"
    shared = f"beam-artifacts:{flags['artifacts-dir']}"  # staged by one, read by the other
    assert shared in job_server["volumes"] and shared in taskmanager["volumes"]
    bind = "${TERMIDATOR_BIND:-127.0.0.1}"
    assert published(job_server) == {8099: bind, 8098: bind}
    assert published(jobmanager) == {8081: bind}
    assert worker["network_mode"] == "service:flink-taskmanager"  # localhost:50000 there
    assert worker["command"][2:] == [
        "apache_beam.runners.worker.worker_pool_main",
        "--service_port=50000",
    ]


def documented_runs(path: Path) -> list[tuple[str, list[str]]]:
    """(compose service, argv after `python -m pipelines run`) of every `docker compose run`
    in the shell blocks of a markdown file, continuation lines joined."""
    runs = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:3] == ["docker", "compose", "run"] and "pipelines" in words:
                start = words.index("python")
                assert words[start : start + 4] == ["python", "-m", "pipelines", "run"], line
                runs.append((words[start - 1], words[start + 4 :]))
    return runs


def test_the_documented_cluster_commands_parse_and_name_the_services(compose):
    from pipelines import options

    runs = documented_runs(ROOT / "docs" / "RUNNERS.md")
    endpoints = set()
    for service, argv in runs:
        assert service in compose["services"], service
        pipeline, flags = argv[0], argv[1:]
        assert pipeline in cli.PIPELINES
        parsed = options.parse(flags).get_all_options()
        endpoints.add(parsed.get("address") or parsed.get("job_endpoint"))
        if parsed.get("environment_type") == "LOOPBACK":  # the task manager calls back
            assert compose["services"][service]["network_mode"] == "service:flink-taskmanager"
    assert {"tcp://dask-scheduler:8786", "flink-job-server:8099"} <= endpoints


def test_every_variable_has_a_default_and_is_documented_in_env_example():
    text = COMPOSE.read_text()
    used = set(VARIABLE.findall(text))
    documented = set(env_example())
    assert used <= documented, f"not in .env.example: {sorted(used - documented)}"
    for match in VARIABLE.finditer(text):
        assert ":-" in match.group(0), f"{match.group(0)} has no default"
    assert not re.search(r"(?<![\w.])/(?:home|root|Users|tmp|work)/", text)


def test_compose_config_validates_where_a_client_exists(tmp_path):
    if shutil.which("docker") and _ok(["docker", "compose", "version"]):
        command = ["docker", "compose"]
    elif shutil.which("docker-compose"):
        command = ["docker-compose"]
    else:
        pytest.skip("no Docker Compose client here (`docker compose` or `docker-compose`)")
    env_file = tmp_path / ".env"
    env_file.write_text((ROOT / ".env.example").read_text())
    result = subprocess.run(
        [*command, "--env-file", str(env_file), "-f", str(COMPOSE), "config"],
        cwd=ROOT,
        env={"PATH": "/usr/local/bin:/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    resolved = yaml.safe_load(result.stdout)
    assert set(resolved["services"]) == {"postgres", *APP_SERVICES}
    dsn = env_example()["TERMIDATOR_DSN"]
    for name in APP_SERVICES:
        assert resolved["services"][name]["environment"]["TERMIDATOR_DSN"] == dsn


def _ok(command: list[str]) -> bool:
    return subprocess.run(command, capture_output=True, timeout=30).returncode == 0


# --- Dockerfile and .dockerignore -----------------------------------------------------------


def test_dockerfile_cmd_is_a_cli_command_and_copies_exist():
    instructions = dockerfile()
    assert instructions[0][0] == "FROM" and instructions[0][1].startswith("python:3.11")
    (cmd,) = [json.loads(rest) for keyword, rest in instructions if keyword == "CMD"]
    check_cli_command(cmd)
    assert not [rest for keyword, rest in instructions if keyword == "ENTRYPOINT"]
    for keyword, rest in instructions:
        if keyword == "COPY":
            *sources, _ = rest.split()
            for source in sources:
                assert (ROOT / source).exists(), f"COPY {source}: no such path"
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users and users[-1] not in ("root", "0")
    exposed = {
        port for keyword, rest in instructions if keyword == "EXPOSE" for port in rest.split()
    }
    assert {"8000", "8888"} <= exposed


def image_requirements() -> tuple[list[str], set[str]]:
    """The extras the Dockerfile installs, and the requirement names they bring in (with
    each extra of a requirement as ``name[extra]``)."""
    extras = set()
    for keyword, rest in dockerfile():
        if keyword == "RUN":
            for named in re.findall(r"\.\[([\w,-]+)\]", rest):
                extras.update(named.split(","))
    install_requires, extras_require = _setup_requirements()
    installed = list(install_requires)
    for extra in extras & set(extras_require):
        installed += extras_require[extra]
    names = set()
    for requirement in installed:
        name, extras_named = re.match(r"\s*([\w.-]+)\s*(?:\[([^\]]*)\])?", requirement).groups()
        names.add(name.lower())
        names.update(f"{name.lower()}[{e.strip()}]" for e in (extras_named or "").split(",") if e)
    return sorted(extras), names


def test_the_image_installs_what_the_notebooks_and_jupyter_need():
    extras, names = image_requirements()
    # Interactive Beam needs Beam's `interactive` extra: it caps pandas below 3, whose
    # removed DataFrame.first breaks `import apache_beam.runners.interactive` in Beam 2.77.
    for needed in ("jupyterlab", "matplotlib", "apache-beam[interactive]"):
        assert needed in names, (
            f"the image would lack {needed}: add it to setup.py (install_requires, or an "
            f"extra the Dockerfile installs: {extras})"
        )


def _setup_requirements() -> tuple[list[str], dict[str, list[str]]]:
    """setup.py's install_requires and extras_require, read without running it."""
    install_requires, extras_require = [], {}
    for node in ast.walk(ast.parse((ROOT / "setup.py").read_text())):
        if isinstance(node, ast.keyword) and node.arg == "install_requires":
            install_requires = ast.literal_eval(node.value)
        if isinstance(node, ast.keyword) and node.arg == "extras_require":
            extras_require = ast.literal_eval(node.value)
    return install_requires, extras_require


def test_dockerignore_keeps_local_state_out_and_the_project_in():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]

    def ignored(path: str) -> bool:
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        return any(
            fnmatch.fnmatch(prefix, pattern) or fnmatch.fnmatch(prefix, pattern.replace("**/", ""))
            for pattern in patterns
            for prefix in prefixes
        )

    for path in (".git", ".venv", ".env", "pipelines/__pycache__", "data/big.json.gz"):
        assert ignored(path), path
    project = ["setup.py", "pyproject.toml", "pipelines/__main__.py", "analysis/notebook.py"]
    project += ["transforms/clean.py", "connectors/sql/001_datalake.sql", "notebooks"]
    samples = sample_files().values()
    project += [f"samples/{Path(path).name}" for files in samples for path in files]
    for path in project:
        assert not ignored(path), path
