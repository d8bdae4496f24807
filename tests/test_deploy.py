"""The deployment files (deploy/) are consistent with the code: they parse, validate against their
schemas/tools where one exists offline (compose-spec JSON schema, `kubectl kustomize`,
`systemd-analyze verify`), run only `v2gpki` commands and flags the CLI accepts, use only V2GPKI_*
variables that are settings or documented in docs/operations.md, reference only files, Secrets,
ConfigMaps and volumes that exist, and — given their own example values — pass the production checks of
pki/config.py. docs/operations.md lists every V2GPKI_* variable the code reads."""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from pki.cli import build_parser
from pki.config import Settings

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose" / "compose.yaml"
COMPOSE_HSM = DEPLOY / "compose" / "compose.network-hsm.yaml"
K8S = DEPLOY / "k8s"
SYSTEMD = DEPLOY / "systemd"
CONTAINERFILE = DEPLOY / "image" / "Containerfile"
OPS_DOC = REPO / "docs" / "operations.md"
VAR = re.compile(r"\bV2GPKI_[A-Z0-9_]*[A-Z0-9]\b")


# -- helpers -----------------------------------------------------------------------------------------------


def parse_cli(argv: list[str]) -> argparse.Namespace:
    """The argv must be accepted by `v2gpki` exactly as an operator would type it."""
    try:
        ns = build_parser().parse_args(argv)
    except SystemExit as exc:
        raise AssertionError(f"`v2gpki {' '.join(argv)}` is not a valid v2gpki command line") from exc
    return ns


def subcommand_path_exists(words: list[str]) -> bool:
    """`hsm init`, `init`, `backup`: the leading words name existing (nested) subcommands."""
    parser: argparse.ArgumentParser = build_parser()
    for w in words:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        if not subs or w not in subs[0].choices:
            return False
        parser = subs[0].choices[w]
    return True


def shell_v2gpki_commands(script: str) -> list[list[str]]:
    """The subcommand words of each `v2gpki ...` invocation in a shell snippet (up to the first flag,
    quote, variable or operator)."""
    out = []
    for m in re.finditer(r"(?:^|[\s/])v2gpki((?:[ \t]+[a-z][a-z0-9-]*)+)", script, flags=re.M):
        out.append(m.group(1).split())
    return out


def yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def unit_settings(path: Path) -> dict[str, list[str]]:
    """key -> values (systemd allows repeated keys), all sections merged."""
    out: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        k, v = line.split("=", 1)
        out.setdefault(k.strip(), []).append(v.strip())
    return out


def documented_vars() -> set[str]:
    return set(VAR.findall(OPS_DOC.read_text()))


def settings_vars() -> set[str]:
    from pki.lifecycle import LifecycleSettings

    names = set(Settings.model_fields) | set(LifecycleSettings.model_fields)
    return {f"V2GPKI_{n.upper()}" for n in names}


def env_example(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            k, v = line.split("=", 1)
            out[k] = v
    return out


def production_settings(env: dict[str, str], tmp_path: Path) -> Settings:
    """Settings from exactly this environment (nothing inherited), with any PIN file made to exist."""
    pin = env.get("V2GPKI_HSM_PIN_FILE")
    if pin:
        assert Path(pin).is_absolute()
    clean = {k: v for k, v in os.environ.items() if not k.startswith("V2GPKI_")}
    saved = os.environ.copy()
    try:
        os.environ.clear()
        os.environ.update(clean | env)
        return Settings(_env_file=None)  # type: ignore[call-arg]
    finally:
        os.environ.clear()
        os.environ.update(saved)


# -- compose -----------------------------------------------------------------------------------------------


def compose_schema() -> dict[str, Any]:
    text = resources.files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    schema: dict[str, Any] = json.loads(text)
    return schema


def compose_errors(doc: dict[str, Any]) -> list[str]:
    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [f"{list(e.path)}: {e.message[:200]}" for e in validator.iter_errors(doc)]


def test_compose_files_validate_against_the_compose_spec() -> None:
    for f in (COMPOSE, COMPOSE_HSM):
        assert compose_errors(yaml.safe_load(f.read_text())) == [], f.name
    # the validator is live: a typo in a service key is caught
    broken = copy.deepcopy(yaml.safe_load(COMPOSE.read_text()))
    broken["services"]["api"]["comand"] = ["serve"]
    assert compose_errors(broken)


def test_compose_services_and_references() -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    services = doc["services"]
    assert {"postgres", "redis", "init", "api", "ocsp", "worker", "beat"} <= set(services)
    build = services["api"]["build"]
    assert (COMPOSE.parent / build["context"] / build["dockerfile"]).resolve() == CONTAINERFILE.resolve()
    for name, svc in services.items():
        for s in svc.get("secrets", []):
            secret = doc["secrets"][s]
            assert (COMPOSE.parent / secret["file"]).parent.name == "secrets", s
        for v in svc.get("volumes", []):
            src = v.split(":", 1)[0]
            assert src in doc["volumes"], (name, src)
        for dep in svc.get("depends_on", {}):
            assert dep in services and dep != name, (name, dep)
    # the roles run the right v2gpki commands (the image's ENTRYPOINT is `v2gpki`)
    for role, cmd in (("api", "serve"), ("ocsp", "ocsp-serve"), ("worker", "worker"), ("beat", "beat")):
        argv = services[role]["command"]
        assert argv[0] == cmd
        parse_cli(argv)
        assert "/run/secrets/hsm_pin" == services[role]["environment"]["V2GPKI_HSM_PIN_FILE"]
        assert "hsm_pin" in services[role]["secrets"]
        assert services[role]["environment"]["PROMETHEUS_MULTIPROC_DIR"] in " ".join(services[role]["tmpfs"])
    init_script = services["init"]["command"][-1]
    cmds = shell_v2gpki_commands(init_script)
    assert ["hsm", "init"] in cmds and ["init"] in cmds
    # `hsm init` reads V2GPKI_HSM_PIN_FILE itself: no `$(cat ...)` whose failure the shell would ignore
    assert "cat " not in init_script and "V2GPKI_HSM_PIN=" not in init_script
    for name, svc in services.items():
        # Podman refuses tmpfs `uid=`; `mode=` works with both
        assert not any("uid=" in m for m in svc.get("tmpfs", [])), name
        # `--scale` needs a host port range (or no published port), never one fixed host port
        for port in svc.get("ports", []):
            host = str(port).rsplit(":", 1)[0]
            assert name in ("api", "ocsp") and re.fullmatch(r"\d+-\d+", host), (name, port)
    for c in cmds:
        assert subcommand_path_exists(c), c
    assert services["beat"].get("deploy", {}).get("replicas") == 1
    # the network-HSM override only touches services of the base file
    override = yaml.safe_load(COMPOSE_HSM.read_text())
    assert set(override["services"]) <= set(services)


def _interpolate(value: str, env: dict[str, str]) -> str:
    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        if name in env and env[name] != "":
            return env[name]
        if op == ":-":
            return arg
        if op == ":?":
            raise AssertionError(f"compose needs {name}: {arg}")
        return ""

    return re.sub(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(:[-?])?([^}]*)\}", sub, value)


def test_compose_environment_passes_production_checks(tmp_path: Path) -> None:
    doc = yaml.safe_load(COMPOSE.read_text())
    dotenv = env_example(COMPOSE.parent / "env.example")
    # production refuses the example's published password; the operator's own value passes
    env = {k: _interpolate(str(v), dotenv) for k, v in doc["services"]["api"]["environment"].items()}
    s = production_settings({k: v for k, v in env.items() if k.startswith("V2GPKI_")}, tmp_path)
    assert [p for p in s.production_problems() if "V2GPKI_DATABASE_URL" in p and "placeholder" in p]
    dotenv["POSTGRES_PASSWORD"] = "an-operators-own-password"
    env = {k: _interpolate(str(v), dotenv) for k, v in doc["services"]["api"]["environment"].items()}
    assert env["V2GPKI_ENV"] == "production"
    s = production_settings({k: v for k, v in env.items() if k.startswith("V2GPKI_")}, tmp_path)
    assert s.production_problems() == []


# -- Kubernetes ----------------------------------------------------------------------------------------------
#
# The kustomizations are rendered in Python (below: the subset of kustomize they use — resources, patches
# by strategic merge or `$patch: delete`, images), so CI needs no kubectl; where kubectl is installed its
# `kubectl kustomize` must give the same objects. Every rendered object is validated against the
# Kubernetes OpenAPI schemas with kubernetes-validate --strict (bundled schemas, offline).

# strategic-merge keys of the lists the patches touch (k8s.io/api patchMergeKey)
_MERGE_KEYS = {"containers": "name", "initContainers": "name", "volumes": "name", "env": "name",
               "volumeMounts": "mountPath", "ports": "containerPort"}


def _smp(base: Any, patch: Any, field: str = "") -> Any:
    """Strategic merge patch (the part kustomize applies here): maps merge, null deletes a key, lists of
    the known fields merge by their key, other lists are replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        out = dict(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = _smp(out[k], v, k)
            else:
                out[k] = _smp({}, v, k) if isinstance(v, dict) else v
        return out
    if isinstance(base, list) and isinstance(patch, list) and field in _MERGE_KEYS:
        key = _MERGE_KEYS[field]
        out_list = [copy.deepcopy(x) for x in base]
        for item in patch:
            idx = next((i for i, x in enumerate(out_list) if x.get(key) == item.get(key)), None)
            if item.get("$patch") == "delete":
                if idx is not None:
                    del out_list[idx]
            elif idx is None:
                out_list.append(item)
            else:
                out_list[idx] = _smp(out_list[idx], item, "")
        return out_list
    return copy.deepcopy(patch)


def _ident(o: dict[str, Any]) -> tuple[str, str, str]:
    return o["kind"], o["metadata"]["name"], o["metadata"].get("namespace", "")


def kustomize(directory: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR`, for the features deploy/k8s* use (anything else fails loudly)."""
    k = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(k) - {"apiVersion", "kind", "resources", "patches", "images"}
    assert not unknown, f"{directory}: the Python renderer does not implement {sorted(unknown)}"
    objs: list[dict[str, Any]] = []
    for r in k.get("resources", []):
        path = (directory / r).resolve()
        objs += kustomize(path) if path.is_dir() else yaml_docs(path)
    for p in k.get("patches", []):
        assert set(p) == {"path"}, p
        for patch in yaml_docs(directory / p["path"]):
            hits = [i for i, o in enumerate(objs) if _ident(o) == _ident(patch)]
            assert len(hits) == 1, (p, _ident(patch))
            if patch.get("$patch") == "delete":
                del objs[hits[0]]
            else:
                objs[hits[0]] = _smp(objs[hits[0]], patch)
    for img in k.get("images", []):
        for o in objs:
            spec = o.get("spec", {}).get("template", {}).get("spec", {})
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                name, _, tag = c["image"].partition(":")
                if name == img["name"]:
                    c["image"] = f"{img.get('newName', name)}:{img.get('newTag', tag)}"
    return objs


K8S_HSM = DEPLOY / "k8s-network-hsm"
K8S_SECRETS = K8S / "examples" / "secret.yaml"


def k8s_objects(directory: Path = K8S) -> list[dict[str, Any]]:
    return kustomize(directory)


def by_kind(kind: str, directory: Path = K8S) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in k8s_objects(directory) if o["kind"] == kind}


def example_secrets() -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for o in yaml_docs(K8S_SECRETS)}


def pod_specs(directory: Path = K8S) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in k8s_objects(directory):
        if o["kind"] in ("Deployment", "Job"):
            yield o["metadata"]["name"], o["spec"]["template"]["spec"]


def kubernetes_validate_errors(objs: list[dict[str, Any]]) -> list[str]:
    import kubernetes_validate  # dev extra (pyproject.toml); bundles the Kubernetes schemas

    out = []
    for o in objs:
        try:
            kubernetes_validate.validate(o, kubernetes_validate.latest_version(), strict=True)
        except kubernetes_validate.ValidationError as exc:
            out.append(f"{_ident(o)}: {exc.message[:300]}")
    return out


def test_k8s_manifests_parse_and_kustomization_lists_them_all() -> None:
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    on_disk = sorted(f.name for f in K8S.glob("*.yaml") if f.name != "kustomization.yaml")
    assert sorted(listed) == on_disk
    for d in (K8S, K8S_HSM):
        for o in k8s_objects(d):
            assert o.get("apiVersion") and o.get("kind") and o["metadata"].get("name"), _ident(o)
            if o["kind"] != "Namespace":
                assert o["metadata"].get("namespace") == "v2gpki", _ident(o)
            # secrets are created by the operator, never applied with placeholder values
            assert o["kind"] != "Secret", (d.name, _ident(o))
    assert set(example_secrets()) == {"v2gpki-db", "v2gpki-hsm-pin", "v2gpki-console"}


def test_k8s_manifests_validate_against_the_kubernetes_schemas() -> None:
    if not (os.environ.get("CI") or os.environ.get("V2GPKI_TEST_REQUIRE_PEERS")):
        pytest.importorskip("kubernetes_validate")
    for d in (K8S, K8S_HSM):
        objs = k8s_objects(d)
        assert len(objs) >= 11, d.name
        assert kubernetes_validate_errors(objs) == [], d.name
    assert kubernetes_validate_errors(yaml_docs(K8S_SECRETS)) == []
    # the validator is live and strict: an unknown field and a wrong type are caught
    broken = copy.deepcopy(by_kind("Deployment")["v2gpki-api"])
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolcy"] = "Always"
    assert kubernetes_validate_errors([broken])
    broken = copy.deepcopy(by_kind("Deployment")["v2gpki-api"])
    broken["spec"]["replicas"] = "two"
    assert kubernetes_validate_errors([broken])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed (the Python renderer is used)")
def test_kubectl_kustomize_agrees_with_the_python_renderer() -> None:
    for d in (K8S, K8S_HSM):
        res = subprocess.run(["kubectl", "kustomize", str(d)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stderr
        theirs = sorted((_unordered(d) for d in yaml.safe_load_all(res.stdout) if d), key=_ident)
        assert theirs == sorted((_unordered(o) for o in k8s_objects(d)), key=_ident), d.name


def _unordered(value: Any, field: str = "") -> Any:
    """Merge-keyed lists sorted by their key (kustomize moves patched items to the front; order is moot)."""
    if isinstance(value, dict):
        return {k: _unordered(v, k) for k, v in value.items()}
    if isinstance(value, list):
        items = [_unordered(v) for v in value]
        return sorted(items, key=lambda x: str(x.get(_MERGE_KEYS[field]))) if field in _MERGE_KEYS else items
    return value


def _mounts_softhsm_pvc(spec: dict[str, Any]) -> bool:
    return any(v.get("persistentVolumeClaim", {}).get("claimName") == "v2gpki-softhsm" for v in spec["volumes"])


def test_k8s_never_scales_pods_that_mount_the_softhsm_volume() -> None:
    """SoftHSM2 is a file store on a ReadWriteOnce volume: one node. The base runs one pod per role on that
    node (required pod affinity); HPAs, PDBs and replicas > 1 exist only in the network-HSM overlay, where
    no pod mounts the volume."""
    for d in (K8S, K8S_HSM):
        objs = k8s_objects(d)
        deps = {o["metadata"]["name"]: o for o in objs if o["kind"] == "Deployment"}
        pvcs = [o for o in objs if o["kind"] == "PersistentVolumeClaim"]
        for p in pvcs:
            assert p["spec"]["accessModes"] == ["ReadWriteOnce"], d.name
        scaled = {o["spec"]["scaleTargetRef"]["name"] for o in objs if o["kind"] == "HorizontalPodAutoscaler"}
        for name, dep in deps.items():
            spec = dep["spec"]["template"]["spec"]
            if _mounts_softhsm_pvc(spec):
                assert dep["spec"]["replicas"] == 1 and name not in scaled, (d.name, name)
                aff = spec["affinity"]["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][0]
                assert aff["topologyKey"] == "kubernetes.io/hostname"
                assert aff["labelSelector"]["matchLabels"].items() <= \
                    dep["spec"]["template"]["metadata"]["labels"].items()
            else:
                assert "affinity" not in spec, (d.name, name)
        if d == K8S:
            assert pvcs and not scaled
            assert all(_mounts_softhsm_pvc(s) for _, s in pod_specs(d))
        else:
            assert not pvcs and scaled == {"v2gpki-api", "v2gpki-ocsp"}
            assert not any(_mounts_softhsm_pvc(s) for _, s in pod_specs(d))
            assert {n for n, o in deps.items() if o["spec"]["replicas"] >= 2} == \
                {"v2gpki-api", "v2gpki-ocsp", "v2gpki-worker"}
            env = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "v2gpki-env")
            assert "softhsm" not in env["data"]["V2GPKI_PKCS11_MODULE"]
        assert deps["v2gpki-beat"]["spec"]["replicas"] == 1


def test_k8s_workloads_probes_resources_and_commands() -> None:
    deps = by_kind("Deployment")
    assert set(deps) == {"v2gpki-api", "v2gpki-ocsp", "v2gpki-worker", "v2gpki-beat"}
    for name, d in deps.items():
        spec = d["spec"]
        assert spec["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        for c in spec["template"]["spec"]["containers"]:
            assert c["image"].split(":")[0] == "v2gpki"
            parse_cli(c["args"])
            req = c["resources"]["requests"]
            assert req.get("cpu") and req.get("memory"), name
            if name in ("v2gpki-api", "v2gpki-ocsp"):
                ports = {p["name"] for p in c["ports"]}
                assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
                assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
                assert c["livenessProbe"]["httpGet"]["port"] in ports
                assert c["readinessProbe"]["httpGet"]["port"] in ports
    assert deps["v2gpki-beat"]["spec"]["replicas"] == 1
    assert deps["v2gpki-beat"]["spec"]["strategy"]["type"] == "Recreate"
    assert parse_cli(deps["v2gpki-api"]["spec"]["template"]["spec"]["containers"][0]["args"]).fn.__name__ == \
        "cmd_serve"
    assert parse_cli(deps["v2gpki-ocsp"]["spec"]["template"]["spec"]["containers"][0]["args"]).fn.__name__ == \
        "cmd_ocsp_serve"
    services = by_kind("Service")
    for s in services.values():
        target = [d for d in deps.values() if s["spec"]["selector"].items() <=
                  d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(target) == 1, s["metadata"]["name"]
    for pdb in by_kind("PodDisruptionBudget", K8S_HSM).values():
        target = [d for d in by_kind("Deployment", K8S_HSM).values() if pdb["spec"]["selector"]["matchLabels"].items()
                  <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert len(target) == 1 and target[0]["spec"]["replicas"] > pdb["spec"]["minAvailable"]
    job = by_kind("Job")["v2gpki-init"]
    script = job["spec"]["template"]["spec"]["containers"][0]["args"][0]
    cmds = shell_v2gpki_commands(script)
    assert ["hsm", "init"] in cmds and ["init"] in cmds
    for c in cmds:
        assert subcommand_path_exists(c), c
    # `hsm init` reads V2GPKI_HSM_PIN_FILE itself: no `$(cat ...)` whose failure the shell would ignore
    assert "cat " not in script and "V2GPKI_HSM_PIN=" not in script


def test_k8s_references_resolve_and_the_pin_is_a_file() -> None:
    secrets = {n: set(o.get("stringData", {})) | set(o.get("data", {})) for n, o in example_secrets().items()}
    for d in (K8S, K8S_HSM):
        configmaps = by_kind("ConfigMap", d)
        pvcs = by_kind("PersistentVolumeClaim", d)
        env_cm = configmaps["v2gpki-env"]["data"]
        for name, spec in pod_specs(d):
            volumes = {v["name"]: v for v in spec["volumes"]}
            for v in volumes.values():
                if "secret" in v:
                    assert v["secret"]["secretName"] in secrets, (name, v)
                if "configMap" in v:
                    assert v["configMap"]["name"] in configmaps, (name, v)
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in pvcs, (name, v)
            for c in spec["containers"]:
                mounts = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}
                assert set(mounts) <= set(volumes), name
                for ref in c.get("envFrom", []):
                    assert ref["configMapRef"]["name"] in configmaps
                for e in c.get("env", []):
                    assert e["name"] != "V2GPKI_HSM_PIN", "the PIN must be a mounted file"
                    ref = e.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["key"] in secrets[ref["name"]], (name, ref)
                # the PIN file lies inside a mounted Secret volume
                pin = env_cm["V2GPKI_HSM_PIN_FILE"]
                holders = [n for n, p in mounts.items() if pin.startswith(p + "/") and "secret" in volumes[n]]
                assert holders, (name, pin)
                assert env_cm["PROMETHEUS_MULTIPROC_DIR"] in mounts.values(), name
                assert env_cm["V2GPKI_POLICIES_DIR"] in mounts.values(), name


def test_k8s_environment_passes_production_checks(tmp_path: Path) -> None:
    for d in (K8S, K8S_HSM):
        env = dict(by_kind("ConfigMap", d)["v2gpki-env"]["data"])
        db = example_secrets()["v2gpki-db"]["stringData"]
        # the operator's values replace the example's placeholders
        env["V2GPKI_DATABASE_URL"], env["V2GPKI_BROKER_URL"] = (
            db["database-url"].replace("REPLACE_ME", "s3cret-from-the-vault"),
            db["broker-url"].replace("REPLACE_ME", "s3cret-from-the-vault"))
        s = production_settings({k: v for k, v in env.items() if k.startswith("V2GPKI_")}, tmp_path)
        assert s.production_problems() == [], d.name
        env["V2GPKI_DATABASE_URL"] = db["database-url"]  # the example's placeholder itself is refused
        s = production_settings({k: v for k, v in env.items() if k.startswith("V2GPKI_")}, tmp_path)
        assert [p for p in s.production_problems() if "placeholder" in p], d.name


def test_k8s_policies_configmap_is_in_sync_with_policies() -> None:
    cm = by_kind("ConfigMap")["v2gpki-policies"]["data"]
    want = {f.name: f.read_text() for f in sorted((REPO / "pki" / "policies").glob("*.yaml"))}
    assert cm == want, "regenerate: python3 deploy/k8s/render_policies.py > deploy/k8s/configmap-policies.yaml"


# -- systemd -------------------------------------------------------------------------------------------------

UNITS = ["v2gpki-api.service", "v2gpki-ocsp.service", "v2gpki-worker.service", "v2gpki-beat.service",
         "v2gpki-init.service", "v2gpki-backup.service"]


def test_systemd_units_run_valid_commands_with_the_pin_as_a_credential() -> None:
    for unit in UNITS:
        s = unit_settings(SYSTEMD / unit)
        assert s["User"] == ["v2gpki"], unit
        assert s["LoadCredential"] == ["hsm-pin:/etc/v2gpki/credentials/hsm-pin"], unit
        assert "V2GPKI_HSM_PIN_FILE=%d/hsm-pin" in s["Environment"], unit
        assert not any(e.startswith("V2GPKI_HSM_PIN=") for e in s.get("Environment", [])), unit
        for line in s.get("ExecStart", []) + s.get("ExecStartPre", []):
            words = shlex.split(line.lstrip("+-@!:"))
            if words[0].endswith("/v2gpki"):
                parse_cli(words[1:])
            else:
                assert words[0] == "/bin/sh", line
                for c in shell_v2gpki_commands(words[-1]):
                    assert subcommand_path_exists(c), (unit, c)
    for unit, cmd in (("v2gpki-api.service", "cmd_serve"), ("v2gpki-ocsp.service", "cmd_ocsp_serve"),
                      ("v2gpki-worker.service", "cmd_worker"), ("v2gpki-beat.service", "cmd_beat")):
        [line] = unit_settings(SYSTEMD / unit)["ExecStart"]
        assert parse_cli(shlex.split(line)[1:]).fn.__name__ == cmd
        s = unit_settings(SYSTEMD / unit)
        if unit in ("v2gpki-api.service", "v2gpki-ocsp.service"):
            rd = s["RuntimeDirectory"][0]
            assert f"PROMETHEUS_MULTIPROC_DIR=%t/{rd}" in s["Environment"]
    target = unit_settings(SYSTEMD / "v2gpki.target")["Wants"][0].split()
    assert set(target) == {u for u in UNITS if u != "v2gpki-backup.service"}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    exe = str(Path(sys.executable).parent / "v2gpki")
    files = []
    for f in sorted(SYSTEMD.iterdir()):
        if f.suffix in (".service", ".timer", ".target"):
            (tmp_path / f.name).write_text(f.read_text().replace("/opt/v2gpki/.venv/bin/v2gpki", exe))
            files.append(str(tmp_path / f.name))
    res = subprocess.run(["systemd-analyze", "verify", *files], capture_output=True, text=True, timeout=120,
                         env=os.environ | {"SYSTEMD_LOG_LEVEL": "info"})
    assert res.returncode == 0 and res.stdout.strip() == "" and res.stderr.strip() == "", res.stdout + res.stderr


def test_systemd_environment_passes_production_checks(tmp_path: Path) -> None:
    env = env_example(SYSTEMD / "v2gpki.env.example")
    env["V2GPKI_HSM_PIN_FILE"] = "/run/credentials/v2gpki-api.service/hsm-pin"  # what %d/hsm-pin becomes
    assert production_settings(env, tmp_path).production_problems() == []


# -- image ---------------------------------------------------------------------------------------------------


def test_containerfile_copies_existing_paths_and_runs_v2gpki() -> None:
    text = CONTAINERFILE.read_text()
    # the production base by default, overridable (CI builds on a debootstrap base: tests/test_image.py)
    assert re.search(r"^ARG BASE=python:3\.11-slim-bookworm$", text, flags=re.M)
    assert re.findall(r"^FROM (\S+)", text, flags=re.M) == ["${BASE}", "${BASE}"]
    # installed into a venv (PEP 668) with the pinned runtime dependency set
    assert "-c deploy/constraints.txt" in text and "ENV PATH=/opt/v2gpki/venv/bin:$PATH" in text
    assert "softhsm2" in text and "postgresql-client" in text
    for m in re.finditer(r"^COPY (?!--from)(.+)$", text, flags=re.M):
        *srcs, _dst = m.group(1).split()
        for src in srcs:
            assert (REPO / src).exists(), src
    assert re.search(r'^ENTRYPOINT \["v2gpki"\]$', text, flags=re.M)
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", text, flags=re.M).group(1))  # type: ignore[union-attr]
    parse_cli(cmd)
    # the default policies ship in the wheel (pki/policies); a policies directory the image names must be in it
    policies = re.search(r"V2GPKI_POLICIES_DIR=(\S+)", text)
    if policies:
        assert re.search(rf"^COPY \S+ {re.escape(policies.group(1))}$", text, flags=re.M), policies.group(1)
    # every package the wheel needs is copied into the build stage
    pyproject = (REPO / "pyproject.toml").read_text()
    for pkg in re.search(r'include = \[(.*?)\]', pyproject).group(1).replace('"', "").split(","):  # type: ignore[union-attr]
        assert f"COPY {pkg.strip().rstrip('*')} " in text, pkg


# -- variables and documentation --------------------------------------------------------------------------


def deploy_texts() -> dict[str, str]:
    files = [p for p in DEPLOY.rglob("*") if p.is_file() and p.suffix not in (".py", ".pyc")]
    files.append(REPO / "scripts" / "stack.sh")
    return {str(p.relative_to(REPO)): p.read_text() for p in files}


def test_deploy_files_use_only_known_variables() -> None:
    known = settings_vars() | documented_vars()
    for name, text in deploy_texts().items():
        unknown = set(VAR.findall(text)) - known
        assert not unknown, f"{name}: {sorted(unknown)} are neither settings nor in docs/operations.md"


def test_operations_doc_lists_every_variable_the_code_reads() -> None:
    used: set[str] = set()
    for top in ("pki", "api", "hsm", "workers", "scripts"):
        for p in (REPO / top).rglob("*"):
            if p.is_file() and p.suffix in (".py", ".sh"):
                used |= set(VAR.findall(p.read_text()))
    used |= settings_vars()
    missing = used - documented_vars()
    assert not missing, f"document in docs/operations.md: {sorted(missing)}"


def test_docs_link_only_to_files_that_exist() -> None:
    for doc in (DEPLOY / "README.md", OPS_DOC):
        for target in re.findall(r"\]\(([^)#:]+)\)", doc.read_text()):
            assert (doc.parent / target).exists(), (doc.name, target)
        for path in re.findall(r"`((?:deploy|scripts|docs|tests)/[A-Za-z0-9_./-]+)`", doc.read_text()):
            assert (REPO / path.rstrip("/")).exists(), (doc.name, path)


def test_stack_script_is_valid_bash_and_uses_the_units() -> None:
    assert subprocess.run(["bash", "-n", str(REPO / "scripts" / "stack.sh")]).returncode == 0
    text = (REPO / "scripts" / "stack.sh").read_text()
    assert "deploy/systemd/v2gpki-$1.service" in text
    if shutil.which("shellcheck"):
        res = subprocess.run(["shellcheck", "-x", str(REPO / "scripts" / "stack.sh")], capture_output=True, text=True)
        assert res.returncode == 0, res.stdout
