"""make mlflow-server: MLflow's tracking server for a team, authenticated, on PostgreSQL.

    python -m onecycle.tracking.team_server --host 0.0.0.0 --allowed-hosts mlflow.example.org

Everything a bad setting would cost is checked first, each refusal one line naming the variable:

* ``MLFLOW_BACKEND_STORE_URI`` must be a PostgreSQL URI, and the database must answer within
  ``--db-wait`` seconds (MLflow itself retries silently for minutes);
* a bind beyond loopback needs ``--allowed-hosts`` (``MLFLOW_SERVER_ALLOWED_HOSTS``): the host
  names clients use, checked by MLflow's middleware against DNS rebinding;
* with authentication (MLflow's ``basic-auth`` app, the default): ``MLFLOW_FLASK_SERVER_SECRET_KEY``,
  and ``MLFLOW_AUTH_ADMIN_PASSWORD`` to create the admin user on the first start, never MLflow's
  old default; a server whose admin still has that default does not start until it is replaced.

The users and permissions live in the same PostgreSQL database (their own tables), through a
generated auth config that names the database without its password. The password travels only
in the environment (``PGPASSWORD`` for the auth store, ``MLFLOW_BACKEND_STORE_URI`` for the
tracking store, which ``mlflow server`` reads itself), so ``ps`` shows no secret.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from onecycle.errors import UserError
from onecycle.redact import redact

LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")
OLD_DEFAULT_PASSWORD = "password1234"  # what MLflow's basic_auth.ini shipped before 3.x
ADMIN = "admin"
DB_WAIT_SECONDS = 20.0  # how long to wait for PostgreSQL (each try's own timeout: 5 s)
HINT = "see docs/teams.md"
# MLflow's basic-auth checks each request's password against a scrypt hash: measured 205 ms of
# server CPU per authenticated request on the 2-core AMD EPYC. Its credential cache (off by
# default in MLflow) skips that for a password checked in the last minute; a password changed
# through another server worker is still accepted until then (MLflow's basic_auth.ini).
AUTH_CACHE_SECONDS = 60


class ServerError(UserError):
    """A setting the server cannot start with; the message names the variable."""


def store_uri(env: dict) -> str:
    uri = env.get("MLFLOW_BACKEND_STORE_URI", "")
    if not uri.startswith(("postgresql://", "postgresql+")):
        raise ServerError(
            "set MLFLOW_BACKEND_STORE_URI=postgresql+psycopg://<user>:<password>@<host>:5432/<db> "
            f"(now: '{redact(uri)}'); {HINT}"
        )
    return uri


def check_bind(host: str, allowed_hosts: str) -> None:
    if host not in LOOPBACK and not allowed_hosts:
        raise ServerError(
            f"MLFLOW_SERVER_HOST={host} accepts connections from other machines: set "
            "MLFLOW_SERVER_ALLOWED_HOSTS to the names clients use (e.g. "
            "MLFLOW_SERVER_ALLOWED_HOSTS=mlflow.example.org,mlflow.example.org:5000), which "
            f"MLflow checks against DNS rebinding; {HINT}"
        )


def allowed_host_list(allowed_hosts: str) -> str:
    """The names given, plus loopback (what the server's own machine uses)."""
    extra = ["localhost", "localhost:*", "127.0.0.1", "127.0.0.1:*"]
    given = [h.strip() for h in allowed_hosts.split(",") if h.strip()]
    return ",".join(dict.fromkeys(given + extra))


def wait_for_db(uri: str, seconds: float) -> None:
    """Connect to the database, retrying for ``seconds``; a ServerError naming it if it never
    answers."""
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri, connect_args={"connect_timeout": 5})
    deadline = time.monotonic() + seconds
    try:
        while True:
            try:
                with engine.connect():
                    return
            except sqlalchemy.exc.SQLAlchemyError as exc:
                if time.monotonic() + 2 > deadline:
                    reason = " ".join(str(getattr(exc, "orig", exc)).split())[:300]
                    raise ServerError(
                        f"PostgreSQL at {redact(uri)} did not answer within {seconds:.0f} s "
                        f"({reason}); start it, or fix MLFLOW_BACKEND_STORE_URI; {HINT}"
                    ) from None
                time.sleep(2)
    finally:
        engine.dispose()


def without_password(uri: str) -> tuple[str, str | None]:
    """(the URI without its password, the password): the password then goes in PGPASSWORD,
    which libpq (psycopg) reads, instead of a file or the command line."""
    from sqlalchemy.engine import URL, make_url

    url = make_url(uri)
    bare = URL.create(
        url.drivername, url.username, None, url.host, url.port, url.database, url.query
    )
    return bare.render_as_string(hide_password=False), url.password


def write_auth_config(
    folder: Path, db_uri: str, default_permission: str, cache_seconds: int = AUTH_CACHE_SECONDS
) -> Path:
    """MLflow's basic_auth.ini, with the users in the tracking store's database (no secret in it:
    the password is in PGPASSWORD, the admin's in MLFLOW_AUTH_ADMIN_PASSWORD), and MLflow's own
    cache of checked credentials for ``cache_seconds`` (0: every request checks the hash)."""
    path = folder / "basic_auth.ini"
    path.write_text(
        "[mlflow]\n"
        f"default_permission = {default_permission}\n"
        f"database_uri = {db_uri}\n"
        f"admin_username = {ADMIN}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        f"auth_cache_ttl_seconds = {cache_seconds}\n"
    )
    return path


def check_auth_cache(seconds: str) -> int:
    try:
        value = int(seconds)
    except ValueError:
        value = -1
    if value < 0:
        raise ServerError(
            f"MLFLOW_SERVER_AUTH_CACHE={seconds}: give whole seconds, 0 or more (how long a "
            f"checked password is trusted without checking its hash again); {HINT}"
        )
    return value


def check_auth_settings(env: dict) -> None:
    if not env.get("MLFLOW_FLASK_SERVER_SECRET_KEY"):
        raise ServerError(
            "set MLFLOW_FLASK_SERVER_SECRET_KEY (e.g. export MLFLOW_FLASK_SERVER_SECRET_KEY="
            "\"$(python -c 'import secrets; print(secrets.token_hex(32))')\"), the same on every "
            f"server; or MLFLOW_SERVER_AUTH=off for a server without users; {HINT}"
        )
    if env.get("MLFLOW_AUTH_ADMIN_PASSWORD") == OLD_DEFAULT_PASSWORD:
        raise ServerError(
            f"MLFLOW_AUTH_ADMIN_PASSWORD is MLflow's old default ({OLD_DEFAULT_PASSWORD}), which "
            f"anyone can look up: set it to a password of 12 characters or more; {HINT}"
        )


def check_admin(uri: str, env: dict) -> None:
    """The admin user is created from MLFLOW_AUTH_ADMIN_PASSWORD on the first start; an admin
    still on the old default password is refused until that variable replaces it."""
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    store = SqlAlchemyStore()
    store.init_db(uri)  # creates or upgrades the user tables, as the server would
    try:
        password = env.get("MLFLOW_AUTH_ADMIN_PASSWORD")
        if not store.has_user(ADMIN, use_primary=True):
            if not password or len(password) < 12:
                raise ServerError(
                    f"the first start creates the user '{ADMIN}': set MLFLOW_AUTH_ADMIN_PASSWORD "
                    f"to its password (12 characters or more); {HINT}"
                )
        elif store.authenticate_user(ADMIN, OLD_DEFAULT_PASSWORD, use_primary=True) and (
            not password or len(password) < 12
        ):
            raise ServerError(
                f"the user '{ADMIN}' still has MLflow's old default password: set "
                "MLFLOW_AUTH_ADMIN_PASSWORD to a new one (12 characters or more) and start again, "
                f"which replaces it; {HINT}"
            )
    finally:
        store.engine.dispose()


def command(args: argparse.Namespace, auth: bool) -> list[str]:
    """``mlflow server`` without the store URI on it (the server reads MLFLOW_BACKEND_STORE_URI
    from the environment)."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--serve-artifacts"]
    cmd += ["--host", args.host, "--port", str(args.port), "--workers", str(args.workers)]
    if args.allowed_hosts:
        cmd += ["--allowed-hosts", allowed_host_list(args.allowed_hosts)]
    if auth:
        cmd += ["--app-name", "basic-auth"]
    return cmd


def prepare(args: argparse.Namespace, env: dict, folder: Path) -> tuple[list[str], dict]:
    """Every check, then the command and its environment."""
    uri = store_uri(env)
    check_bind(args.host, args.allowed_hosts)
    if args.auth not in ("basic-auth", "off"):
        raise ServerError(
            f"MLFLOW_SERVER_AUTH={args.auth}: use basic-auth (the default: users and permissions) "
            f"or off (no users: anyone who reaches the server may do anything); {HINT}"
        )
    auth = args.auth == "basic-auth"
    cache_seconds = check_auth_cache(str(args.auth_cache))
    if auth:
        check_auth_settings(env)
    else:
        warn_unauthenticated(args.host, args.port)
    wait_for_db(uri, args.db_wait)
    env = dict(env)
    env.setdefault("MLFLOW_ARTIFACTS_DESTINATION", str(args.artifacts))
    # MLflow's job runner serves GenAI features (scorers, trace archival) this pipeline never
    # uses; on, it adds 8 processes and polls (measured: 12.6 s of CPU per 30 s idle on the
    # 2-core AMD EPYC, 0.1 s without). MLFLOW_SERVER_ENABLE_JOB_EXECUTION=true turns it back on.
    env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
    if auth:
        db_uri, password = without_password(uri)
        if password:
            env["PGPASSWORD"] = password
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(
            write_auth_config(folder, db_uri, args.default_permission, cache_seconds)
        )
        check_admin(uri, env)
    return command(args, auth), env


def warn_unauthenticated(host: str, port: int) -> None:
    print(
        f"mlflow-server: WARNING: authentication is off (MLFLOW_SERVER_AUTH=off): anyone who "
        f"reaches {host}:{port} can read, delete and replace every run, artifact and model",
        file=sys.stderr,
        flush=True,
    )


def serve(cmd: list[str], env: dict) -> int:
    """Run the server until it ends; SIGTERM and SIGINT are passed on to it."""
    proc = subprocess.Popen(cmd, env=env)

    def forward(signum, frame):
        proc.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    return proc.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m onecycle.tracking.team_server", description=__doc__
    )
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--allowed-hosts", default="", help="MLFLOW_SERVER_ALLOWED_HOSTS")
    ap.add_argument("--auth", default="basic-auth", help="MLFLOW_SERVER_AUTH: basic-auth or off")
    ap.add_argument("--default-permission", default="READ", help="what a new user may do")
    ap.add_argument("--artifacts", type=Path, default=Path("mlartifacts-server").resolve())
    ap.add_argument("--db-wait", type=float, default=DB_WAIT_SECONDS)
    ap.add_argument(
        "--auth-cache",
        default=str(AUTH_CACHE_SECONDS),
        help="MLFLOW_SERVER_AUTH_CACHE: seconds a checked password is trusted (0: never)",
    )
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="onecycle-mlflow-server-") as folder:
        try:
            cmd, env = prepare(args, dict(os.environ), Path(folder))
        except UserError as exc:
            print(f"mlflow-server: error: {redact(str(exc))}", file=sys.stderr)
            return 2
        return serve(cmd, env)


if __name__ == "__main__":
    sys.exit(main())
