"""No secret lands anywhere it can be read (docs/teams.md): a URL's password and a signed
query string are redacted in log lines, error messages, MLflow params, tags, run names, datasets
and logged files, and the JSON files the stages write; a data.source with credentials is refused
before DVC records it, and the download reads them from ~/.netrc or the environment instead; a
registered model that is not the pipeline's own flavor is refused without unpickling it; the
team server's launcher refuses bad settings in one line. The same end to end, through a real
server and `dvc exp run`: tests/test_scaleout.py."""

from __future__ import annotations

import argparse
import base64
import functools
import http.server
import json
import threading
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest

from onecycle import files, progress
from onecycle.config import ConfigError, DataConfig, parse_params
from onecycle.data import download, prepared, sources
from onecycle.errors import DataError, UserError
from onecycle.pipeline import runner
from onecycle.redact import has_credentials, redact
from onecycle.tracking import connect, lifecycle, provenance, recorder, team_server

from .test_data import assert_dataset, make_image_folder, make_tar
from .test_tracking import empty, migrated, store  # noqa: F401 - fixtures

PASSWORD, SIGNATURE, CREDENTIAL = "s3cr3tpw", "SIGabc123", "AKIA%2F2024"
WITH_PASSWORD = f"http://alice:{PASSWORD}@127.0.0.1:9/set.tar.gz"
SIGNED = f"https://bucket.s3.amazonaws.com/set.tar.gz?X-Amz-Signature={SIGNATURE}&X-Amz-Credential={CREDENTIAL}"
SECRETS = (PASSWORD, SIGNATURE, CREDENTIAL)


def assert_clean(text: str) -> None:
    for secret in SECRETS:
        assert secret not in text, text


def test_redact_hides_a_password_and_query_values_and_keeps_the_rest():
    assert redact(f"could not download {WITH_PASSWORD} (URLError)") == (
        "could not download http://alice:***@127.0.0.1:9/set.tar.gz (URLError)"
    )
    assert redact(f"({SIGNED}).") == (
        "(https://bucket.s3.amazonaws.com/set.tar.gz?X-Amz-Signature=***&X-Amz-Credential=***)."
    )
    assert redact("postgresql+psycopg://mlflow:p@ss@db:5432/mlflow") == (
        "postgresql+psycopg://mlflow:***@db:5432/mlflow"
    )
    assert redact("s3://KEY:SECRET@bucket/dvc, sqlite:////abs/mlflow.db") == (
        "s3://KEY:***@bucket/dvc, sqlite:////abs/mlflow.db"
    )
    plain = "cifar10 (md5 c58f30108f718f92721af3b95e74349a) http://host:5000/#/experiments/1"
    assert redact(plain) == plain
    assert redact("https://ghp_token@example.org/x.zip") == "https://***@example.org/x.zip"
    assert redact("postgresql://mlflow@db/mlflow") == "postgresql://mlflow@db/mlflow"  # a name
    assert has_credentials(WITH_PASSWORD) and has_credentials("https://token@host/x.zip")
    assert not has_credentials(SIGNED) and not has_credentials("data/set@2.tar.gz")


@pytest.mark.parametrize("url", [WITH_PASSWORD, SIGNED])
def test_log_lines_and_a_stages_error_are_redacted(url, capsys):
    progress.say(f"warning: MLflow at {url} failed")

    def main():
        raise DataError(f"could not download {url} (HTTPError: 401)")

    with pytest.raises(SystemExit):
        runner.run(main, "download")
    out = capsys.readouterr()
    assert_clean(out.out + out.err)
    assert "***" in out.out and "download: error: could not download" in out.err


@pytest.mark.usefixtures("store")
@pytest.mark.parametrize("url", [WITH_PASSWORD, SIGNED])
def test_mlflow_params_tags_run_names_files_and_datasets_are_redacted(url, tmp_path, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", f"exp-{url}")
    params_yaml = tmp_path / "params.yaml"
    params_yaml.write_text(f"data:\n  source: {url}\n")
    data = SimpleNamespace(
        meta={"source": f"{url} (md5 {'0' * 32})", "fingerprint": "f"},
        x_train=np.zeros((2, 8, 8, 3), np.uint8),
        y_train=np.zeros(2, np.int64),
        x_test=np.zeros((1, 8, 8, 3), np.uint8),
        y_test=np.zeros(1, np.int64),
    )
    with lifecycle.stage_run("train", tags={"lr_find_run_id": url}) as run:
        run.log_params({"data": {"source": url}, "data_source": url})
        run.set_tags({"warning": f"see {url}"})
        run.log_files(params_yaml)
        run.log_datasets(provenance.datasets(data))
        lifecycle.write_run_ref(tmp_path / "runs.json", run)
    client = mlflow.MlflowClient()
    got = client.get_run(run.run_id)
    assert_clean(json.dumps([got.data.params, got.data.tags, got.info.run_name]))
    assert got.data.params["data.source"].count("***") >= 1
    for ds in got.inputs.dataset_inputs:
        assert_clean(ds.dataset.name + ds.dataset.source)
    assert_clean(Path(client.download_artifacts(run.run_id, "params.yaml")).read_text())
    assert_clean((tmp_path / "runs.json").read_text())
    assert params_yaml.read_text().count(url) == 1  # the user's own file is left as it is


@pytest.mark.parametrize("url", [WITH_PASSWORD, SIGNED])
def test_metrics_runs_and_prepared_meta_json_are_redacted(url, tmp_path):
    files.write_json(tmp_path / "metrics.json", {"sources": {"data": url}, "n": [1, url]})
    assert_clean((tmp_path / "metrics.json").read_text())
    ds = prepared.Dataset(
        np.zeros((2, 8, 8, 3), np.uint8),
        np.array([0, 1]),
        np.zeros((2, 8, 8, 3), np.uint8),
        np.array([0, 1]),
        ["a", "b"],
    )
    meta = prepared.save_prepared(ds, tmp_path / "prepared", f"{url} (md5 {'0' * 32})").meta
    assert_clean(meta["source"] + (tmp_path / "prepared" / "meta.json").read_text())
    recorder_ = recorder.Recorder("r", "e", url)
    lifecycle.write_run_ref(tmp_path / "run.json", recorder_)
    assert_clean((tmp_path / "run.json").read_text())


@pytest.mark.usefixtures("store")
def test_a_tracking_uri_with_a_password_is_redacted_in_the_stages_error(monkeypatch):
    from .test_tracking import _closed_port

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://alice:{PASSWORD}@127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(connect.TrackingError) as err:
        connect.setup()
    assert "http://alice:***@127.0.0.1" in str(err.value)
    assert_clean(str(err.value))


@pytest.mark.parametrize(
    "code, needle",
    [
        (401, "refused the credentials (as user bob; opening it): set MLFLOW_TRACKING_USERNAME"),
        (403, "does not let user bob write here (starting a run: permission denied)"),
    ],
)  # fmt: skip
def test_a_refusal_by_the_server_is_one_line_naming_the_variables(code, needle, monkeypatch):
    from mlflow.exceptions import MlflowException
    from mlflow.utils.rest_utils import get_error_code

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "bob")
    what = "opening it" if code == 401 else "starting a run"
    exc = MlflowException("API request failed", error_code=get_error_code(code))  # as MLflow's
    err = connect.access_error(exc, f"http://bob:{PASSWORD}@mlflow:5000", what)
    assert isinstance(err, connect.AccessError) and needle in str(err)
    assert "\n" not in str(err) and "http://bob:***@mlflow:5000" in str(err)
    assert connect.access_error(ValueError("boom"), "http://mlflow:5000", what) is None


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key (cryptography, an MLflow dependency)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_pem, key_pem = folder / "cert.pem", folder / "key.pem"
    cert_pem.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_pem.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_pem, key_pem


@pytest.fixture
def tls_server(tmp_path, monkeypatch):
    """HTTPS on 127.0.0.1 with a self-signed certificate, as a TLS proxy in front of a team
    server would present it. Behind the handshake it answers the two calls a stage makes first
    (the experiment by name and by id) as MLflow's REST API does; the TLS handshake is real."""
    import ssl

    cert, key = _self_signed(tmp_path)
    experiment = {"experiment_id": "7", "name": connect.EXPERIMENT, "lifecycle_stage": "active",
                  "artifact_location": "mlflow-artifacts:/7",
                  "tags": [{"key": k, "value": v} for k, v in connect.EXPERIMENT_KIND.items()]}  # fmt: skip

    class Api(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = json.dumps({"experiment": experiment}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True).start()
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://127.0.0.1:{httpd.server_address[1]}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    # setup() makes experiment 7 the active one: restored for the tests after this one
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_ID", raising=False)
    yield cert
    httpd.shutdown()
    httpd.server_close()
    mlflow.set_tracking_uri(None)


def test_a_self_signed_server_is_refused_in_one_line_naming_the_cert_variable(tls_server, tmp_path):
    with pytest.raises(connect.AccessError) as err:
        connect.setup(tmp_path)
    msg = str(err.value)
    assert "presented a TLS certificate that this machine does not trust (opening it)" in msg
    assert "set MLFLOW_TRACKING_SERVER_CERT_PATH" in msg and "\n" not in msg


def test_with_its_certificate_named_the_stage_talks_to_the_server_over_tls(
    tls_server, tmp_path, monkeypatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_SERVER_CERT_PATH", str(tls_server))
    assert connect.setup(tmp_path) == "7"


# ---------------------------------------------------------------- data.source credentials


def test_a_data_source_with_credentials_is_refused_naming_netrc_and_the_variables():
    for source in (WITH_PASSWORD, "https://ghp_token@example.org/set.zip"):
        with pytest.raises(ConfigError) as err:
            parse_params({"data": {"source": source}})
        msg = str(err.value)
        assert "data.source: a URL with credentials would be recorded in dvc.lock" in msg
        assert "~/.netrc" in msg and "ONECYCLE_DATA_USERNAME" in msg
        assert PASSWORD not in msg and "ghp_token" not in msg
    assert parse_params({"data": {"source": SIGNED}}).data.source == SIGNED  # signed: redacted


@pytest.fixture
def basic_auth_http(tmp_path, monkeypatch):
    """An image-folder archive served on 127.0.0.1 to alice:s3cr3tpw only; (URL, expected)."""
    for var in (
        "http_proxy",
        "HTTP_PROXY",
        "all_proxy",
        "ALL_PROXY",
        *download.CREDENTIAL_VARIABLES,
    ):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    served = tmp_path / "served"
    served.mkdir()
    expected = make_image_folder(tmp_path / "imgs")
    make_tar(tmp_path / "imgs", served / "imgs.tar.gz")
    wanted = "Basic " + base64.b64encode(f"alice:{PASSWORD}".encode()).decode()

    class Guarded(http.server.SimpleHTTPRequestHandler):
        def do_GET(self):
            if self.headers.get("Authorization") != wanted:
                self.send_response(401)
                self.send_header("WWW-Authenticate", 'Basic realm="data"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            super().do_GET()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Guarded, directory=str(served))
    )
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}/imgs.tar.gz", expected
    server.shutdown()
    server.server_close()


def _fetch(url, tmp_path):
    cfg = DataConfig(source=url, timeout=5.0)
    return sources.fetch(cfg, tmp_path, tmp_path / "raw")


def test_a_download_that_needs_credentials_says_where_to_put_them(basic_auth_http, tmp_path):
    url, _ = basic_auth_http
    with pytest.raises(DataError, match=r"HTTP Error 401.*\n.*~/.netrc .*ONECYCLE_DATA_USERNAME"):
        _fetch(url, tmp_path)


def test_netrc_credentials_download_from_a_basic_auth_server(
    basic_auth_http, tmp_path, monkeypatch
):
    url, expected = basic_auth_http
    netrc = tmp_path / "netrc"
    netrc.write_text(f"machine 127.0.0.1 login alice password {PASSWORD}\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    ds, desc = _fetch(url, tmp_path)
    assert_dataset(ds, expected)
    assert PASSWORD not in desc


def test_environment_credentials_download_and_wrong_ones_are_named(
    basic_auth_http, tmp_path, monkeypatch
):
    url, expected = basic_auth_http
    monkeypatch.setenv("ONECYCLE_DATA_USERNAME", "alice")
    monkeypatch.setenv("ONECYCLE_DATA_PASSWORD", PASSWORD)
    assert_dataset(_fetch(url, tmp_path)[0], expected)
    monkeypatch.setenv("ONECYCLE_DATA_PASSWORD", "wrong-password")
    with pytest.raises(DataError, match="refused the credentials from ONECYCLE_DATA_USERNAME"):
        _fetch(url, tmp_path / "again")


# ---------------------------------------------------------------- the team server's launcher


def _args(**kw) -> argparse.Namespace:
    base = dict(host="127.0.0.1", port=5000, workers=1, allowed_hosts="", auth="basic-auth",
                default_permission="READ", artifacts=Path("a"), db_wait=1.0,
                auth_cache="60")  # fmt: skip
    return argparse.Namespace(**base | kw)


GOOD_ENV = {
    "MLFLOW_BACKEND_STORE_URI": f"postgresql+psycopg://mlflow:{PASSWORD}@127.0.0.1:9/mlflow",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "k" * 32,
    "MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-admin-password",
}


@pytest.mark.parametrize(
    "args, env, variable",
    [
        ({}, {"MLFLOW_BACKEND_STORE_URI": "sqlite:///x.db"}, "MLFLOW_BACKEND_STORE_URI"),
        ({"host": "0.0.0.0"}, {}, "MLFLOW_SERVER_ALLOWED_HOSTS"),
        ({}, {"MLFLOW_FLASK_SERVER_SECRET_KEY": ""}, "MLFLOW_FLASK_SERVER_SECRET_KEY"),
        ({}, {"MLFLOW_AUTH_ADMIN_PASSWORD": "password1234"}, "MLFLOW_AUTH_ADMIN_PASSWORD"),
        ({"auth": "none"}, {}, "MLFLOW_SERVER_AUTH"),
        ({"auth_cache": "a minute"}, {}, "MLFLOW_SERVER_AUTH_CACHE"),
        ({"auth_cache": "-1"}, {}, "MLFLOW_SERVER_AUTH_CACHE"),
        ({}, {}, "MLFLOW_BACKEND_STORE_URI"),  # port 9: PostgreSQL never answers
    ],
)
def test_the_server_launcher_refuses_bad_settings_in_one_line(args, env, variable, tmp_path):
    with pytest.raises(UserError) as err:
        team_server.prepare(_args(**args), GOOD_ENV | env, tmp_path)
    msg = str(err.value)
    assert variable in msg and "\n" not in msg and PASSWORD not in msg


def test_an_admin_still_on_the_old_default_password_is_refused_until_replaced(tmp_path):
    from mlflow.server.auth.sqlalchemy_store import SqlAlchemyStore

    uri = f"sqlite:///{tmp_path / 'auth.db'}"
    with pytest.raises(UserError, match="first start creates the user 'admin': set MLFLOW_AUTH_"):
        team_server.check_admin(uri, {})
    store_ = SqlAlchemyStore()
    store_.init_db(uri)
    store_.create_user("admin", "password1234", is_admin=True)  # an old server's bootstrap
    with pytest.raises(UserError, match="still has MLflow's old default password: set MLFLOW_AUTH"):
        team_server.check_admin(uri, {})
    team_server.check_admin(uri, {"MLFLOW_AUTH_ADMIN_PASSWORD": "a-long-admin-password"})


def test_the_server_command_holds_no_secret_and_auth_off_is_warned_about(tmp_path, capsys):
    cmd = team_server.command(_args(host="0.0.0.0", allowed_hosts="mlflow.example.org"), True)
    assert cmd[-2:] == ["--app-name", "basic-auth"] and not any(PASSWORD in c for c in cmd)
    assert "mlflow.example.org,localhost" in cmd[cmd.index("--allowed-hosts") + 1]
    db, password = team_server.without_password(GOOD_ENV["MLFLOW_BACKEND_STORE_URI"])
    assert password == PASSWORD and PASSWORD not in db
    ini = team_server.write_auth_config(tmp_path, db, "READ", 60).read_text()
    assert f"database_uri = {db}" in ini and PASSWORD not in ini
    assert "auth_cache_ttl_seconds = 60" in ini  # MLflow's own credential cache
    team_server.warn_unauthenticated("0.0.0.0", 5000)
    assert "WARNING: authentication is off (MLFLOW_SERVER_AUTH=off)" in capsys.readouterr().err


def test_mlflows_view_run_lines_are_printed_redacted(monkeypatch, capsys):
    def end_run(status):
        print(f"🏃 View run x at: http://alice:{PASSWORD}@mlflow:5000/#/experiments/1/runs/2")

    monkeypatch.setattr(mlflow, "end_run", end_run)
    lifecycle._end_run("FINISHED")
    assert (
        capsys.readouterr().out
        == "🏃 View run x at: http://alice:***@mlflow:5000/#/experiments/1/runs/2\n"
    )
