"""The Kubernetes manifests: they render, validate strictly against several Kubernetes
versions, and say what the deployment needs (security, probes, resources, GPUs, network
paths, least-privilege RBAC, references that resolve)."""

from __future__ import annotations

import copy
import ipaddress
import re
import shlex
from dataclasses import dataclass

import pytest

from k8s_render import (
    OVERLAYS,
    all_containers,
    by_prefix,
    container,
    container_env,
    command_line,
    get,
    kubectl,
    objects,
    pod_template,
    render,
    selector_matches,
    service_selects,
    var_refs,
    workloads,
)

pytestmark = pytest.mark.skipif(kubectl() is None, reason="kubectl (for `kubectl kustomize`) is not on PATH")

import kubernetes_validate.utils as kv_utils
from packaging.version import Version  # noqa: E402

from expert_store.discovery import K8sTarget, parse_target  # noqa: E402

NAMESPACE = "adapmoe"
GRPC_SERVICES = {("StatefulSet", "expert-store"): "expert-store", ("Deployment", "decoder"): "decoder"}


def k8s_versions() -> list[str]:
    """1.29 up to the newest kubernetes-validate ships."""
    versions = sorted({v for v in kv_utils.all_versions() if Version(v) >= Version("1.29")}, key=Version)
    assert versions and versions[0].startswith("1.29"), versions
    return versions


@pytest.fixture(scope="module", autouse=True)
def cached_schemas():
    """kubernetes-validate re-reads its JSON schema files on every call; read each once."""
    import functools

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kv_utils, "schema_contents", functools.lru_cache(maxsize=None)(kv_utils.schema_contents))
        yield


@pytest.fixture(scope="module", params=list(OVERLAYS))
def overlay(request):
    return request.param


@pytest.fixture(scope="module")
def docs(overlay):
    return render(overlay)


# ------------------------------------------------------------------ render + schema


def test_overlays_render_with_expected_objects(docs):
    keys = [(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs]
    assert len(keys) == len(set(keys)), "duplicate objects"
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"].get("namespace") == NAMESPACE, f"{d['kind']}/{d['metadata']['name']} not namespaced"
    kinds = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for expected in [
        ("Namespace", NAMESPACE), ("StatefulSet", "expert-store"), ("Service", "expert-store"),
        ("Service", "expert-store-headless"), ("Deployment", "redis"), ("Service", "redis"),
        ("Deployment", "decoder"), ("Service", "decoder"), ("Job", "expert-store-pack"),
        ("ServiceAccount", "decoder"), ("ServiceAccount", "expert-store-pack"), ("Role", "expert-store-discovery"),
        ("RoleBinding", "decoder-expert-store-discovery"), ("RoleBinding", "expert-store-pack-expert-store-discovery"),
        ("Job", "expert-store-calibrate"), ("ServiceAccount", "expert-store-calibrate"),
        ("RoleBinding", "expert-store-calibrate-expert-store-discovery"), ("PodDisruptionBudget", "expert-store"),
        ("PodDisruptionBudget", "decoder"), ("NetworkPolicy", "default-deny-all"),
    ]:
        assert expected in kinds, f"{expected} missing"
    by_prefix(docs, "ConfigMap", "adapmoe-settings")
    by_prefix(docs, "ConfigMap", "adapmoe-model")


def test_every_object_validates_strictly_on_every_supported_version(docs):
    versions = k8s_versions()
    assert Version(versions[-1]) >= Version("1.33"), versions  # the newest it ships is covered
    failures = []
    for version in versions:
        for d in docs:
            try:
                kv_utils.validate(d, version, strict=True)
            except (kv_utils.ValidationError, kv_utils.SchemaNotFoundError) as e:
                where = ".".join(str(p) for p in getattr(e, "path", []))
                failures.append(f"{version} {d['kind']}/{d['metadata']['name']}: {where}: {getattr(e, 'message', e)}")
    assert not failures, "\n".join(failures[:30])


def test_strict_validation_catches_a_misspelt_field():
    """The schema check above can fail: an unknown field or a wrong type is rejected."""
    sts = copy.deepcopy(get(render("dev"), "StatefulSet", "expert-store"))
    c = pod_template(sts)["spec"]["containers"][0]
    c["readinessProbe"]["grpc"]["prot"] = 50051
    with pytest.raises(kv_utils.ValidationError):
        kv_utils.validate(sts, k8s_versions()[0], strict=True)
    del c["readinessProbe"]["grpc"]["prot"]
    c["resources"]["limits"]["memory"] = {"bytes": 1}
    with pytest.raises(kv_utils.ValidationError):
        kv_utils.validate(sts, k8s_versions()[-1], strict=True)


# ------------------------------------------------------------------ pod security


def test_pods_run_non_root_with_read_only_root_and_no_capabilities(docs):
    for w in workloads(docs):
        name = f"{w['kind']}/{w['metadata']['name']}"
        spec = pod_template(w)["spec"]
        psc = spec.get("securityContext") or {}
        assert psc.get("runAsNonRoot") is True, name
        assert psc.get("runAsUser", 1) != 0 and psc.get("runAsGroup", 1) != 0, name
        assert (psc.get("seccompProfile") or {}).get("type") == "RuntimeDefault", name
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), name
        volumes = {v["name"]: v for v in spec.get("volumes") or []}
        # Pod Security "restricted": only these volume types
        allowed = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                   "projected", "secret"}
        for v in volumes.values():
            assert set(v) - {"name"} <= allowed, f"{name}: volume {v}"
        for c in all_containers(spec):
            where = f"{name}:{c['name']}"
            sc = c.get("securityContext") or {}
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("privileged") in (None, False), where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
            assert sc.get("runAsUser", 1) != 0, where
            assert not any("hostPort" in p for p in c.get("ports") or []), where
            assert (sc.get("seccompProfile") or psc.get("seccompProfile"))["type"] == "RuntimeDefault", where
            # a read-only root needs a writable, size-limited /tmp
            tmp = [m for m in c.get("volumeMounts") or [] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1, f"{where}: no /tmp mount"
            assert "emptyDir" in volumes[tmp[0]["name"]] and volumes[tmp[0]["name"]]["emptyDir"].get("sizeLimit"), where


def test_adapmoe_image_runs_as_the_dockerfile_user(docs):
    dockerfile = (OVERLAYS["base"].parents[1] / "docker" / "Dockerfile").read_text()
    user = re.findall(r"^USER\s+(\d+):(\d+)\s*$", dockerfile, re.M)
    assert user, "the Dockerfile must end on a numeric non-root USER"
    uid, gid = map(int, user[-1])
    for w in workloads(docs):
        spec = pod_template(w)["spec"]
        if any(c["image"].startswith("adapmoe") for c in all_containers(spec)):
            assert spec["securityContext"]["runAsUser"] == uid and spec["securityContext"]["runAsGroup"] == gid
            assert spec["securityContext"]["fsGroup"] == gid  # PVC and secret files readable


def test_namespace_enforces_restricted_pod_security(docs):
    ns = get(docs, "Namespace", NAMESPACE)
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_resources_set_on_every_container(docs):
    for w in workloads(docs):
        for c in all_containers(pod_template(w)["spec"]):
            where = f"{w['kind']}/{w['metadata']['name']}:{c['name']}"
            res = c.get("resources") or {}
            req, lim = res.get("requests") or {}, res.get("limits") or {}
            assert {"cpu", "memory", "ephemeral-storage"} <= req.keys(), where
            assert {"memory", "ephemeral-storage"} <= lim.keys(), where
            assert _bytes(lim["memory"]) >= _bytes(req["memory"]), where


def _bytes(q: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T)?", str(q))
    assert m, q
    mult = {None: 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
    return float(m.group(1)) * mult[m.group(2)]


def test_redis_fits_its_memory_limit(docs):
    c = container(docs, "Deployment", "redis")
    env = container_env(docs, {}, c, NAMESPACE)
    argv = command_line(docs, c, env)
    maxmemory = argv[argv.index("--maxmemory") + 1]
    m = re.fullmatch(r"(\d+)(mb|gb)", maxmemory)
    assert m, maxmemory
    mm = int(m.group(1)) * (2**20 if m.group(2) == "mb" else 2**30)
    limit = _bytes(c["resources"]["limits"]["memory"])
    assert mm <= 0.85 * limit, f"maxmemory {maxmemory} leaves no headroom under {limit}"


# ------------------------------------------------------------------ probes and ports


def probed_health_service(kind: str, name: str, probe: str) -> str:
    """The grpc.health.v1 service name each probe must ask: readiness the overall status ("")
    everywhere; the decoder's startup and liveness its LIVENESS_SERVICE, SERVING while the
    process works (also while --wait-for-model waits for the pack Job), NOT_SERVING when its
    batch scheduler died."""
    if name == "decoder" and probe in ("startupProbe", "livenessProbe"):
        from decoder.serving.service import LIVENESS_SERVICE

        return LIVENESS_SERVICE
    return ""


def test_grpc_services_use_native_grpc_probes(docs):
    for (kind, name), _svc in GRPC_SERVICES.items():
        c = container(docs, kind, name)
        grpc_port = {p["name"]: p["containerPort"] for p in c["ports"]}["grpc"]
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            p = c.get(probe)
            assert p, f"{name}: no {probe}"
            handlers = {"grpc", "exec", "httpGet", "tcpSocket"} & p.keys()
            assert handlers == {"grpc"}, f"{name}.{probe} uses {handlers}"
            assert p["grpc"]["port"] == grpc_port, f"{name}.{probe} probes the wrong port"
            assert p["grpc"].get("service", "") == probed_health_service(kind, name, probe), f"{name}.{probe}"
        # the listen address on the command line is the probed port
        env = container_env(docs, pod_template(get(docs, kind, name))["metadata"], c, NAMESPACE)
        argv = command_line(docs, c, env)
        assert argv[argv.index("--listen") + 1].endswith(f":{grpc_port}")
        # liveness is never stricter than readiness: an overloaded pod is unready, not killed
        live, ready = c["livenessProbe"], c["readinessProbe"]
        assert live["periodSeconds"] * live["failureThreshold"] > ready["periodSeconds"] * ready["failureThreshold"]


def test_decoder_caches_fit_its_memory_limit(docs):
    """Host tier + shared-memory arena (+ the 'GPU' slots when the device is the CPU) stay well
    under the container's memory limit; on cuda the GPU slots are device memory."""
    c = container(docs, "Deployment", "decoder")
    argv = command_line(docs, c, container_env(docs, {}, c, NAMESPACE))
    opts = dict(zip(argv, argv[1:]))
    from decoder.cli import parse_size

    host, gpu = parse_size(opts["--host-cache-bytes"]), parse_size(opts["--gpu-cache-bytes"])
    volumes = {v["name"]: v for v in pod_template(get(docs, "Deployment", "decoder"))["spec"]["volumes"]}
    (shm,) = [volumes[m["name"]] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"]
    assert shm["emptyDir"]["medium"] == "Memory"  # counts against the memory limit
    used = host + _bytes(shm["emptyDir"]["sizeLimit"]) + (gpu if opts["--device"] == "cpu" else 0)
    assert used <= 0.75 * _bytes(c["resources"]["limits"]["memory"])
    assert gpu > 0 and host > 0


def test_shutdown_fits_the_termination_grace_period(docs):
    for kind, name in GRPC_SERVICES:
        c = container(docs, kind, name)
        argv = command_line(docs, c, container_env(docs, {}, c, NAMESPACE))
        opts = dict(zip(argv, argv[1:]))
        budget = float(opts.get("--drain", 0)) + float(opts["--grace"])
        assert budget + 5 <= pod_template(get(docs, kind, name))["spec"]["terminationGracePeriodSeconds"], name


def test_redis_requires_the_password_the_store_sends(docs):
    """redis-server's --requirepass, the probes' REDISCLI_AUTH and the store's
    --redis-password-file all come from one Secret key; protected mode stays on."""
    c = container(docs, "Deployment", "redis")
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in c["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert c["args"][c["args"].index("--requirepass") + 1] == "$(REDIS_PASSWORD)"
    assert "--protected-mode" not in c["args"]
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"]
    for probe in ("readinessProbe", "livenessProbe"):
        assert c[probe]["exec"]["command"][0] == "redis-cli"  # authenticates with REDISCLI_AUTH
    store = container(docs, "StatefulSet", "expert-store")
    argv = command_line(docs, store, container_env(docs, {}, store, NAMESPACE))
    volume, key = _mounted_file(docs, "StatefulSet", "expert-store", argv[argv.index("--redis-password-file") + 1])
    assert (volume["secret"]["secretName"], key) == (env["REDIS_PASSWORD"]["name"], env["REDIS_PASSWORD"]["key"])
    assert "@" not in argv[argv.index("--redis") + 1]  # no password in the URL (it is in a ConfigMap)


def test_storage_class_is_one_overlay_setting():
    """base: the cluster's default class; gpu: one storageClassName on the store's NVMe claim,
    which the pack Job's hub cache claim follows."""
    def classes(docs):
        (claim,) = get(docs, "StatefulSet", "expert-store")["spec"]["volumeClaimTemplates"]
        job = pod_template(get(docs, "Job", "expert-store-pack"))["spec"]
        (cache,) = [v for v in job["volumes"] if v["name"] == "hf-cache"]
        return claim["spec"].get("storageClassName"), cache["ephemeral"]["volumeClaimTemplate"]["spec"].get(
            "storageClassName")

    assert classes(render("base")) == (None, None)
    nvme, cache = classes(render("gpu"))
    assert nvme and cache == nvme


def test_redis_is_a_non_persistent_lru_cache(docs):
    c = container(docs, "Deployment", "redis")
    argv = command_line(docs, c, container_env(docs, {}, c, NAMESPACE))
    assert argv[0] == "redis-server"
    opts = dict(zip(argv[1::2], argv[2::2]))
    assert opts["--maxmemory-policy"] == "allkeys-lru"
    assert opts["--save"] == "" and opts["--appendonly"] == "no"
    assert {"tcpSocket", "exec"} & c["readinessProbe"].keys()
    assert opts["--port"] == str(c["ports"][0]["containerPort"])
    volumes = {v["name"]: v for v in pod_template(get(docs, "Deployment", "redis"))["spec"]["volumes"]}
    assert all("persistentVolumeClaim" not in v for v in volumes.values())


def test_services_select_their_pods_and_name_real_ports(docs):
    pods = {(w["kind"], w["metadata"]["name"]): pod_template(w) for w in workloads(docs)}
    for svc in objects(docs, "Service"):
        matched = [k for k, t in pods.items() if service_selects(svc, t["metadata"]["labels"])]
        assert len(matched) == 1, f"Service {svc['metadata']['name']} selects {matched}"
        ports = {}
        for c in pod_template(get(docs, *matched[0]))["spec"]["containers"]:
            for p in c.get("ports") or []:
                ports[p["name"]] = p["containerPort"]
        for p in svc["spec"]["ports"]:
            tp = p.get("targetPort", p["port"])
            assert tp in ports or tp in ports.values(), f"{svc['metadata']['name']}:{p['name']} -> {tp}"


def test_store_statefulset_has_nvme_volume_and_headless_service(docs):
    sts = get(docs, "StatefulSet", "expert-store")
    headless = get(docs, "Service", sts["spec"]["serviceName"])
    assert headless["spec"]["clusterIP"] == "None"
    assert not headless["spec"].get("publishNotReadyAddresses")  # dns:/// gets ready pods only
    assert service_selects(headless, pod_template(sts)["metadata"]["labels"])
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    c = container(docs, "StatefulSet", "expert-store")
    mount = {m["name"]: m["mountPath"] for m in c["volumeMounts"]}[claim["metadata"]["name"]]
    argv = command_line(docs, c, container_env(docs, {}, c, NAMESPACE))
    assert argv[:2] == ["expert-store", "serve"]
    assert argv[argv.index("--store") + 1] == mount
    assert argv[argv.index("--redis") + 1].startswith("redis://redis:")
    assert get(docs, "Service", "expert-store")["spec"].get("clusterIP") != "None"


def test_pdbs_cover_store_and_decoder_and_allow_one_eviction(docs):
    pdbs = objects(docs, "PodDisruptionBudget")
    for kind, name in GRPC_SERVICES:
        w = get(docs, kind, name)
        labels = pod_template(w)["metadata"]["labels"]
        covering = [p for p in pdbs if selector_matches(p["spec"]["selector"], labels)]
        assert len(covering) == 1, f"{name}: {len(covering)} PDBs"
        spec = covering[0]["spec"]
        # a PDB that forbids every eviction blocks node drains; maxUnavailable: 1 never does
        assert spec.get("maxUnavailable") == 1 and "minAvailable" not in spec


def test_env_and_var_references_resolve(docs, overlay):
    """Every $(VAR) in command/args is defined, and every ConfigMap/Secret/SA/PVC exists
    (the gpu overlay and base expect the token and Redis password Secrets and the calibration
    text's ConfigMap from the operator; the optional HF token Secret may be absent anywhere)."""
    external = {("Secret", "adapmoe-store-token"), ("Secret", "adapmoe-decoder-token"),
                ("Secret", "adapmoe-redis-auth"), ("ConfigMap", "adapmoe-calibration")}
    present = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for sts in objects(docs, "StatefulSet"):  # claims the StatefulSet controller creates
        for tmpl in sts["spec"].get("volumeClaimTemplates") or []:
            for i in range(sts["spec"]["replicas"]):
                present.add(("PersistentVolumeClaim", f"{tmpl['metadata']['name']}-{sts['metadata']['name']}-{i}"))
    for w in workloads(docs):
        spec = pod_template(w)["spec"]
        sa = spec.get("serviceAccountName", "default")
        assert ("ServiceAccount", sa) in present, sa
        refs = set()
        for v in spec.get("volumes") or []:
            if "secret" in v:
                refs.add(("Secret", v["secret"]["secretName"]))
            if "configMap" in v:
                refs.add(("ConfigMap", v["configMap"]["name"]))
            if "persistentVolumeClaim" in v:
                refs.add(("PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"]))
        for c in all_containers(spec):
            defined = {e["name"] for e in c.get("env") or []}
            for text in (c.get("command") or []) + (c.get("args") or []):
                undefined = var_refs(text) - defined
                assert not undefined, f"{w['metadata']['name']}:{c['name']} uses undefined {undefined}"
            for e in c.get("env") or []:
                ref = (e.get("valueFrom") or {}).get("configMapKeyRef")
                if ref:
                    cm = get(docs, "ConfigMap", ref["name"])
                    assert ref["key"] in cm["data"], f"{ref['name']} has no key {ref['key']}"
                secret_ref = (e.get("valueFrom") or {}).get("secretKeyRef")
                if secret_ref and not secret_ref.get("optional"):
                    refs.add(("Secret", secret_ref["name"]))
        for ref in refs:
            if overlay == "dev":
                assert ref in present, f"dev must be self-contained: {ref} missing"
            else:
                assert ref in present or ref in external, ref


def test_dev_overlay_is_cpu_only_with_a_clearly_fake_token():
    docs = render("dev")
    for w in workloads(docs):
        for c in all_containers(pod_template(w)["spec"]):
            res = c.get("resources") or {}
            assert "nvidia.com/gpu" not in {**res.get("requests", {}), **res.get("limits", {})}
    assert by_prefix(docs, "ConfigMap", "adapmoe-settings")["data"]["DECODER_DEVICE"] == "cpu"
    assert get(docs, "StatefulSet", "expert-store")["spec"]["replicas"] == 1
    assert sorted(j["metadata"]["name"] for j in objects(docs, "Job")) == ["expert-store-calibrate",
                                                                         "expert-store-pack"]
    import base64

    for name, key in (("adapmoe-store-token", "token"), ("adapmoe-decoder-token", "token"),
                      ("adapmoe-redis-auth", "password")):
        token = base64.b64decode(by_prefix(docs, "Secret", name)["data"][key]).decode()
        assert "dev" in token and "placeholder" in token
    # the pack Job builds the demo checkpoint itself: nothing to provision
    job_spec = pod_template(get(docs, "Job", "expert-store-pack"))["spec"]
    assert [c["command"] + c["args"][:1] for c in job_spec["initContainers"]] == [["moe-decoder", "train-demo"]]
    # and the calibration text ships with the overlay
    text = by_prefix(docs, "ConfigMap", "adapmoe-calibration")["data"]["text"]
    assert len(text) > 4000 and "def " in text


@pytest.mark.parametrize("overlay_name", ["base", "gpu"])
def test_no_secret_values_outside_the_dev_overlay(overlay_name):
    assert not objects(render(overlay_name), "Secret")


def test_gpu_overlay_requests_one_gpu_for_the_decoder_only():
    docs = render("gpu")
    dec = get(docs, "Deployment", "decoder")
    spec = pod_template(dec)["spec"]
    res = container(docs, "Deployment", "decoder")["resources"]
    assert str(res["limits"]["nvidia.com/gpu"]) == "1" and str(res["requests"]["nvidia.com/gpu"]) == "1"
    assert spec["nodeSelector"].get("nvidia.com/gpu.present") == "true"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert by_prefix(docs, "ConfigMap", "adapmoe-settings")["data"]["DECODER_DEVICE"] == "cuda"
    assert re.search(r"cu\d+", container(docs, "Deployment", "decoder")["image"])
    # a rollout must not need a spare GPU
    assert dec["spec"]["strategy"]["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}
    for w in workloads(docs):
        if w["metadata"]["name"] == "decoder":
            continue
        for c in all_containers(pod_template(w)["spec"]):
            assert "nvidia.com/gpu" not in (c.get("resources") or {}).get("limits", {}), w["metadata"]["name"]


def _store_target(docs, kind: str, name: str, container_name: str | None = None) -> K8sTarget:
    """The k8s:// store target a workload's first container dials, checked against the render:
    our namespace, a Service port by name that selects the store's pods."""
    c = container(docs, kind, name, container_name)
    argv = command_line(docs, c, container_env(docs, {}, c, NAMESPACE))
    target = parse_target(argv[argv.index("--store") + 1])
    assert isinstance(target, K8sTarget) and target.namespace == NAMESPACE, target
    svc = get(docs, "Service", target.service)
    assert target.port in {p["name"] for p in svc["spec"]["ports"]}
    assert service_selects(svc, pod_template(get(docs, "StatefulSet", "expert-store"))["metadata"]["labels"])
    return target


def test_one_pack_job_packs_into_every_ready_store_replica(docs):
    """One Job for the whole StatefulSet (it replaced one Job per replica writing into that
    replica's claim): pack uploads over gRPC to every ready endpoint of the store Service,
    with the store's token, and retries in place until the store is ready."""
    job = get(docs, "Job", "expert-store-pack")
    spec = pod_template(job)["spec"]
    # a failed attempt (store not ready yet: pack exits 1 with one UNAVAILABLE line) restarts
    # the container in the same pod: init containers and the checkpoint volume are kept
    assert spec["restartPolicy"] == "OnFailure" and job["spec"]["backoffLimit"] >= 6
    assert "affinity" not in spec  # no volume to share with a replica: it may run anywhere
    (c,) = spec["containers"]
    argv = command_line(docs, c, container_env(docs, {}, c, NAMESPACE))
    parser, args = _cli_parser(argv)
    opts = vars(parser.parse_args(args))
    assert argv[:2] == ["expert-store", "pack"] and opts["placement"] == "all"
    _store_target(docs, "Job", "expert-store-pack", "pack")
    cm = by_prefix(docs, "ConfigMap", "adapmoe-model")["data"]
    assert opts["model"] == cm["MODEL_NAME"] and opts["checkpoint"] == cm["CHECKPOINT"]
    assert list(opts["precisions"]) == cm["PACK_PRECISIONS"].split(",")
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    if opts["checkpoint"].startswith("hf://"):  # from the hub (base, gpu)
        from expert_store.hub import parse_hub_ref

        parse_hub_ref(opts["checkpoint"])
    else:  # a directory in a mounted volume (dev: trained by the init container)
        assert any(opts["checkpoint"] == m or opts["checkpoint"].startswith(m + "/") for m in mounts)
    # huggingface_hub's cache is a volume (not the small /tmp); the token, when there is one,
    # comes from its Secret (optional: public models need none)
    env = {e["name"]: e for e in c["env"]}
    assert env["HF_HUB_CACHE"]["value"] in mounts
    hf_token = env["HF_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert hf_token == {"name": "adapmoe-hf-token", "key": "token", "optional": True}
    # the token the store checks (--token-file), from the same Secret key
    store = container(docs, "StatefulSet", "expert-store")
    store_argv = command_line(docs, store, container_env(docs, {}, store, NAMESPACE))
    store_token = _mounted_file(docs, "StatefulSet", "expert-store", store_argv[store_argv.index("--token-file") + 1])
    pack_token = _mounted_file(docs, "Job", "expert-store-pack", opts["token_file"], "pack")
    assert (pack_token[0]["secret"]["secretName"], pack_token[1]) == (
        store_token[0]["secret"]["secretName"], store_token[1])
    # no store volume: the replicas write what they receive into their own claims
    sts = get(docs, "StatefulSet", "expert-store")
    claim_prefix = f"{sts['spec']['volumeClaimTemplates'][0]['metadata']['name']}-{sts['metadata']['name']}-"
    for v in spec["volumes"]:
        assert not (v.get("persistentVolumeClaim") or {}).get("claimName", "").startswith(claim_prefix), v


def test_decoder_waits_for_the_pack_jobs_instead_of_crash_looping(docs):
    """The decoder starts before (or while) the pack Jobs run: it must wait for the model,
    forever (a Job may take long), unready meanwhile and alive for its liveness probe."""
    c = container(docs, "Deployment", "decoder")
    argv = command_line(docs, c, container_env(docs, {}, c, NAMESPACE))
    parser, args = _cli_parser(argv)
    opts = vars(parser.parse_args(args))
    assert opts["wait_for_model"] is True and opts["wait_timeout"] is None
    # a rollout that waits for a pack Job is not reported as failed after the default 10 minutes
    assert get(docs, "Deployment", "decoder")["spec"].get("progressDeadlineSeconds", 600) >= 3600
    assert c["readinessProbe"]["grpc"].get("service", "") == ""  # unready until the model is loaded
    from decoder.serving.service import LIVENESS_SERVICE

    for probe in ("startupProbe", "livenessProbe"):  # not killed while waiting or loading
        assert c[probe]["grpc"].get("service") == LIVENESS_SERVICE, probe


def test_decoder_serves_the_model_the_jobs_pack(docs):
    c = container(docs, "Deployment", "decoder")
    argv = command_line(docs, c, container_env(docs, {}, c, NAMESPACE))
    models = {argv[argv.index("--model") + 1]}
    for job in objects(docs, "Job"):
        (pc,) = pod_template(job)["spec"]["containers"]
        pargv = command_line(docs, pc, container_env(docs, {}, pc, NAMESPACE))
        models.add(pargv[pargv.index("--model") + 1])
    assert len(models) == 1, models


def test_decoder_gates_adaptively_on_the_profile_the_calibrate_job_stores(docs):
    """The decoder runs adaptive gating by default with the calibrated budget (no --budget:
    the profile's budget for the default single-expert ratio) and, with --wait-for-model,
    waits for that profile. The calibrate Job calibrates the model the pack Job packs, read
    from the same store the decoder reads (at the decoder's precision), with the store's
    token, on the text of its ConfigMap, and uploads the profile; it waits for the pack Job
    instead of failing while the model is not there."""
    from decoder.cli import PROFILE_GATINGS

    dec = container(docs, "Deployment", "decoder")
    parser, args = _cli_parser(command_line(docs, dec, container_env(docs, {}, dec, NAMESPACE)))
    dopts = vars(parser.parse_args(args))
    assert dopts["gating"] == "adaptive" and dopts["budget"] is None and dopts["single_expert_ratio"] is None
    assert dopts["wait_for_model"] and dopts["gating"] in PROFILE_GATINGS  # the wait includes the profile

    job = get(docs, "Job", "expert-store-calibrate")
    spec = pod_template(job)["spec"]
    assert spec["restartPolicy"] == "OnFailure" and job["spec"]["backoffLimit"] >= 1
    (c,) = spec["containers"]
    argv = command_line(docs, c, container_env(docs, {}, c, NAMESPACE))
    assert argv[:2] == ["moe-decoder", "calibrate"]
    parser, args = _cli_parser(argv)
    opts = vars(parser.parse_args(args))
    assert opts["upload"] and opts["out"] is None  # into the store; the root filesystem is read-only
    assert opts["wait_for_model"] and opts["wait_timeout"] is None
    assert (opts["model"], opts["precision"]) == (dopts["model"], dopts["precision"])
    assert _store_target(docs, "Job", "expert-store-calibrate", "calibrate") == _store_target(
        docs, "Deployment", "decoder")
    # the store's token, from the Secret the store reads
    store = container(docs, "StatefulSet", "expert-store")
    store_argv = command_line(docs, store, container_env(docs, {}, store, NAMESPACE))
    store_token = _mounted_file(docs, "StatefulSet", "expert-store", store_argv[store_argv.index("--token-file") + 1])
    token = _mounted_file(docs, "Job", "expert-store-calibrate", opts["store_token_file"], "calibrate")
    assert (token[0]["secret"]["secretName"], token[1]) == (store_token[0]["secret"]["secretName"], store_token[1])
    # the calibration text: key `text` of ConfigMap adapmoe-calibration, mounted read-only
    (mount,) = [m for m in c["volumeMounts"] if opts["text"].startswith(m["mountPath"] + "/")]
    (vol,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert re.fullmatch(r"adapmoe-calibration(-[a-z0-9]{10})?", vol["configMap"]["name"]), vol
    assert opts["text"][len(mount["mountPath"]) + 1:] == "text" and mount.get("readOnly")


def test_tuning_changes_roll_the_services_but_leave_the_immutable_jobs_alone(tmp_path):
    """A Job's pod template is immutable: `kubectl apply` after a settings change must not
    need to change it. Render a copy of the tree with one tuning value changed."""
    import shutil
    import subprocess

    tree = tmp_path / "k8s"
    shutil.copytree(OVERLAYS["base"].parent, tree)
    kust = tree / "overlays" / "dev" / "kustomization.yaml"
    text = kust.read_text()
    assert "      - DECODER_MAX_ACTIVE=4\n" in text
    kust.write_text(text.replace("      - DECODER_MAX_ACTIVE=4\n", "      - DECODER_MAX_ACTIVE=5\n"))
    proc = subprocess.run([kubectl(), "kustomize", str(tree / "overlays" / "dev")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    import yaml

    changed = [d for d in yaml.safe_load_all(proc.stdout) if d]
    before = render("dev")
    for job in objects(before, "Job"):
        assert get(changed, "Job", job["metadata"]["name"]) == job
    assert pod_template(get(changed, "Deployment", "decoder")) != pod_template(get(before, "Deployment", "decoder"))


def test_store_ram_tiers_fit_the_memory_limit(docs):
    c = container(docs, "StatefulSet", "expert-store")
    argv = command_line(docs, c, container_env(docs, {}, c, NAMESPACE))
    workers = int(argv[argv.index("--workers") + 1])
    ram = argv[argv.index("--ram-bytes") + 1]
    m = re.fullmatch(r"(\d+)([KMG])", ram)
    assert m, ram
    ram_bytes = int(m.group(1)) * {"K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)]
    assert workers * ram_bytes <= 0.6 * _bytes(c["resources"]["limits"]["memory"])


# ------------------------------------------------------------------ RBAC


def _discovery_clients(docs) -> dict[str, str]:
    """Workloads whose command line dials a k8s:// target -> their ServiceAccount."""
    out = {}
    for w in workloads(docs):
        spec = pod_template(w)["spec"]
        for c in all_containers(spec):
            if any(a.startswith("k8s://") for a in c.get("args") or []):
                out[w["metadata"]["name"]] = spec["serviceAccountName"]
    return out


def test_rbac_is_least_privilege_for_discovery(docs):
    assert not objects(docs, "ClusterRole") and not objects(docs, "ClusterRoleBinding")
    (role,) = objects(docs, "Role")
    (rule,) = role["rules"]
    assert rule["apiGroups"] == ["discovery.k8s.io"]
    assert rule["resources"] == ["endpointslices"]
    assert sorted(rule["verbs"]) == ["get", "list", "watch"]
    assert "resourceNames" not in rule or rule["resourceNames"]
    # exactly the k8s:// clients (the decoder and the pack and calibrate Jobs) are bound to it,
    # each with its own ServiceAccount
    clients = _discovery_clients(docs)
    assert clients == {"decoder": "decoder", "expert-store-pack": "expert-store-pack",
                       "expert-store-calibrate": "expert-store-calibrate"}
    bound = set()
    for binding in objects(docs, "RoleBinding"):
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}
        (subject,) = binding["subjects"]
        assert subject["kind"] == "ServiceAccount" and subject["namespace"] == NAMESPACE
        bound.add(subject["name"])
    assert bound == set(clients.values())
    # only their pods get an API token
    for w in workloads(docs):
        spec = pod_template(w)["spec"]
        if w["metadata"]["name"] in clients:
            assert spec.get("automountServiceAccountToken", True)
        else:
            assert spec.get("automountServiceAccountToken") is False, w["metadata"]["name"]
            assert spec.get("serviceAccountName") not in bound


def test_decoder_discovers_the_store_service_it_may_read(docs):
    c = container(docs, "Deployment", "decoder")
    env = container_env(docs, {}, c, NAMESPACE)
    argv = command_line(docs, c, env)
    assert argv[:2] == ["moe-decoder", "serve"]
    # the RoleBindings live where the watched EndpointSlices are (decoder, pack and calibrate Jobs)
    for kind, name, binding in (("Deployment", "decoder", "decoder-expert-store-discovery"),
                                ("Job", "expert-store-pack", "expert-store-pack-expert-store-discovery"),
                                ("Job", "expert-store-calibrate", "expert-store-calibrate-expert-store-discovery")):
        target = _store_target(docs, kind, name, {"expert-store-pack": "pack",
                                                  "expert-store-calibrate": "calibrate"}.get(name))
        assert get(docs, "RoleBinding", binding)["metadata"]["namespace"] == target.namespace


# ------------------------------------------------------------------ NetworkPolicy semantics


@dataclass(frozen=True)
class Peer:
    name: str
    namespace: str | None  # None: not a pod (an IP outside the cluster's pods)
    labels: tuple = ()
    ports: tuple = ()  # (name, number, protocol) the peer listens on
    ip: str = "10.244.0.10"

    @property
    def label_dict(self):
        return dict(self.labels)


NAMESPACE_LABELS = {
    NAMESPACE: {"kubernetes.io/metadata.name": NAMESPACE},
    "apps": {"kubernetes.io/metadata.name": "apps"},
    "monitoring": {"kubernetes.io/metadata.name": "monitoring"},
    "kube-system": {"kubernetes.io/metadata.name": "kube-system"},
}


def _peer_matches(peer_rule: dict, peer: Peer, policy_ns: str) -> bool:
    if "ipBlock" in peer_rule:
        block = peer_rule["ipBlock"]
        ip = ipaddress.ip_address(peer.ip)
        if ip not in ipaddress.ip_network(block["cidr"]):
            return False
        return not any(ip in ipaddress.ip_network(x) for x in block.get("except") or [])
    if peer.namespace is None:
        return False  # pod/namespace selectors match pods only
    ns_sel, pod_sel = peer_rule.get("namespaceSelector"), peer_rule.get("podSelector")
    if ns_sel is None:
        ns_ok = peer.namespace == policy_ns
    else:
        ns_ok = selector_matches(ns_sel, NAMESPACE_LABELS[peer.namespace])
    pod_ok = True if pod_sel is None else selector_matches(pod_sel, peer.label_dict)
    return ns_ok and pod_ok


def _port_matches(rule_ports, dst: Peer, port: int, protocol: str) -> bool:
    if not rule_ports:
        return True
    for p in rule_ports:
        if p.get("protocol", "TCP") != protocol:
            continue
        want = p.get("port")
        if want is None:
            return True
        if isinstance(want, int):
            end = p.get("endPort", want)
            if want <= port <= end:
                return True
        elif any(n == want and num == port and proto == protocol for n, num, proto in dst.ports):
            return True
    return False


def _allowed_one_way(policies, subject: Peer, other: Peer, direction: str, dst: Peer, port, protocol) -> bool:
    """Does `subject`'s namespace policy set let traffic in/out of subject?"""
    if subject.namespace != NAMESPACE:
        return True  # no policies elsewhere in this model
    policy_type = "Ingress" if direction == "ingress" else "Egress"
    selecting = [
        p for p in policies
        if selector_matches(p["spec"]["podSelector"], subject.label_dict)
        and policy_type in p["spec"].get("policyTypes", ["Ingress"])
    ]
    if not selecting:
        return True
    key = "from" if direction == "ingress" else "to"
    for p in selecting:
        for rule in p["spec"].get(direction) or []:
            peers = rule.get(key)
            peer_ok = True if not peers else any(_peer_matches(r, other, NAMESPACE) for r in peers)
            if peer_ok and _port_matches(rule.get("ports"), dst, port, protocol):
                return True
    return False


def allowed(policies, src: Peer, dst: Peer, port: int, protocol: str = "TCP") -> bool:
    return _allowed_one_way(policies, src, dst, "egress", dst, port, protocol) and _allowed_one_way(
        policies, dst, src, "ingress", dst, port, protocol
    )


def _cluster_peers(docs) -> list[Peer]:
    peers = []
    for w in workloads(docs):
        t = pod_template(w)
        ports = tuple(
            (p.get("name"), p["containerPort"], p.get("protocol", "TCP"))
            for c in t["spec"]["containers"] for p in c.get("ports") or []
        )
        peers.append(Peer(w["metadata"]["name"], NAMESPACE, tuple(sorted(t["metadata"]["labels"].items())), ports))
    return peers


def test_network_policies_allow_exactly_the_intended_paths(docs):
    policies = objects(docs, "NetworkPolicy")
    ours = _cluster_peers(docs)
    dns = Peer("kube-dns", "kube-system", (("k8s-app", "kube-dns"),), (("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")))
    apiserver = Peer("apiserver", None, ports=(("https", 443, "TCP"), ("https-alt", 6443, "TCP")), ip="172.18.0.2")
    outsiders = [
        Peer("client", "apps", (("adapmoe.io/decoder-client", "true"),)),
        Peer("stranger", "apps", (("app", "web"),)),
        Peer("stranger-in-ns", NAMESPACE, (("app", "debug"),)),
        Peer("scraper", "monitoring", (("adapmoe.io/metrics-scraper", "true"),)),
        Peer("internet", None, ip="93.184.216.34"),
    ]
    hub = Peer("hub", None, ports=(("https", 443, "TCP"),), ip="18.239.50.80")  # huggingface.co's CDN
    sources = ours + outsiders
    destinations = ours + [dns, apiserver, hub, outsiders[2]]
    got = set()
    for src in sources:
        for dst in destinations:
            if src == dst:
                continue
            candidate_ports = {(num, proto) for _, num, proto in dst.ports} | {(22, "TCP"), (8080, "TCP")}
            for num, proto in candidate_ports:
                if NAMESPACE not in (src.namespace, dst.namespace):
                    continue  # only our namespace has policies in this model
                if allowed(policies, src, dst, num, proto):
                    got.add((src.name, dst.name, num, proto))

    def ports_of(name, port_name):
        for p in ours:
            if p.name == name:
                return next(num for n, num, _ in p.ports if n == port_name)
        raise KeyError(name)

    store, dec, pack, cal = "expert-store", "decoder", "expert-store-pack", "expert-store-calibrate"
    expected = {
        ("client", dec, ports_of(dec, "grpc"), "TCP"),
        ("client", dec, ports_of(dec, "http"), "TCP"),  # the OpenAI HTTP API
        ("scraper", dec, ports_of(dec, "metrics"), "TCP"),
        ("scraper", store, ports_of(store, "metrics"), "TCP"),
        (dec, store, ports_of(store, "grpc"), "TCP"),
        (store, "redis", ports_of("redis", "redis"), "TCP"),
        (dec, "apiserver", 443, "TCP"),
        (dec, "apiserver", 6443, "TCP"),
        # the pack Job uploads to the store's gRPC port after listing its EndpointSlices
        (pack, store, ports_of(store, "grpc"), "TCP"),
        (pack, "apiserver", 443, "TCP"),
        (pack, "apiserver", 6443, "TCP"),
        # the pack Job downloads an hf:// checkpoint; the API-server rules name ports only, so
        # the decoder's reaches any HTTPS address too until an ipBlock narrows it
        (pack, "hub", 443, "TCP"),
        (dec, "hub", 443, "TCP"),
        # the calibrate Job reads the model from the store and uploads its profile there, after
        # listing the EndpointSlices (the same port-only API-server rule)
        (cal, store, ports_of(store, "grpc"), "TCP"),
        (cal, "apiserver", 443, "TCP"),
        (cal, "apiserver", 6443, "TCP"),
        (cal, "hub", 443, "TCP"),
    }
    for p in ours + [outsiders[2]]:  # every pod in the namespace resolves names
        expected |= {(p.name, "kube-dns", 53, "UDP"), (p.name, "kube-dns", 53, "TCP")}
    assert got == expected, f"unexpected: {sorted(got - expected)}; missing: {sorted(expected - got)}"


def test_network_policy_evaluator_sees_a_hole():
    """The evaluator above is not vacuous: opening redis to everyone shows up."""
    docs = render("base")
    policies = copy.deepcopy(objects(docs, "NetworkPolicy"))
    redis_np = next(p for p in policies if p["metadata"]["name"] == "redis")
    peers = {p.name: p for p in _cluster_peers(docs)}
    assert not allowed(policies, peers["decoder"], peers["redis"], 6379)
    redis_np["spec"]["ingress"][0]["from"].append({"namespaceSelector": {}})
    for p in policies:  # and let the decoder's egress reach it
        if p["metadata"]["name"] == "decoder":
            p["spec"]["egress"].append({"to": [{"podSelector": {}}]})
    assert allowed(policies, peers["decoder"], peers["redis"], 6379)


def _cli_parser(argv: list[str]):
    """The real argparse parser behind a rendered command line, and the args it parses."""
    if argv[0] == "expert-store":
        from expert_store.cli import build_parser

        return build_parser(), argv[1:]
    if argv[0] == "moe-decoder" and argv[1] == "serve":
        from decoder.cli import build_serve_parser as build_parser

        return build_parser(), argv[2:]
    if argv[0] == "moe-decoder" and argv[1] == "calibrate":
        from decoder.calibrate import build_parser

        return build_parser(), argv[2:]
    if argv[0] == "moe-decoder" and argv[1] == "train-demo":
        from decoder.train_demo import build_parser

        return build_parser(), argv[2:]
    raise AssertionError(f"no known CLI for {argv[:2]}")


def test_command_lines_parse_with_the_real_clis(docs, capsys):
    """Every adapmoe container's expanded command line is accepted by the CLI it runs, so a
    renamed or removed flag fails here, not in a CrashLoopBackOff."""
    checked = 0
    for w in workloads(docs):
        t = pod_template(w)
        for c in all_containers(t["spec"]):
            if not c["image"].startswith("adapmoe"):
                continue
            meta = {"annotations": {"batch.kubernetes.io/job-completion-index": "0"}}
            argv = command_line(docs, c, container_env(docs, meta, c, NAMESPACE))
            parser, args = _cli_parser(argv)
            try:
                parser.parse_args(args)
            except SystemExit:
                raise AssertionError(f"{w['metadata']['name']}:{c['name']}: {argv} rejected: "
                                     f"{capsys.readouterr().err.strip()}") from None
            checked += 1
    assert checked >= 3


def test_manifest_command_lines_quote_cleanly(docs):
    """No argument carries shell syntax the container would not interpret (no shell runs)."""
    for w in workloads(docs):
        for c in all_containers(pod_template(w)["spec"]):
            for arg in (c.get("command") or []) + (c.get("args") or []):
                assert not re.search(r"[;&|`]|\$\{", arg), f"{w['metadata']['name']}: {shlex.quote(arg)}"


# ------------------------------------------------------------------ optional TLS component (1.37+)


@pytest.fixture(scope="module")
def tls_docs(tmp_path_factory):
    """The gpu overlay with components/tls, rendered from a copy of the tree."""
    import shutil
    import subprocess

    import yaml

    tree = tmp_path_factory.mktemp("tls") / "k8s"
    shutil.copytree(OVERLAYS["base"].parent, tree)
    overlay = tree / "overlays" / "gpu-tls"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        "resources:\n  - ../gpu\ncomponents:\n  - ../../components/tls\n")
    proc = subprocess.run([kubectl(), "kustomize", str(overlay)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def _mounted_file(docs, kind, name, path, container_name=None) -> tuple[dict, str]:
    """The Secret volume and key that back a file path inside a container."""
    t = pod_template(get(docs, kind, name))
    c = container(docs, kind, name, container_name)
    for m in c["volumeMounts"]:
        if path.startswith(m["mountPath"] + "/"):
            vol = next(v for v in t["spec"]["volumes"] if v["name"] == m["name"])
            rel = path[len(m["mountPath"]) + 1:]
            items = {i["path"]: i["key"] for i in vol["secret"].get("items") or []}
            return vol, items.get(rel, rel)
    raise AssertionError(f"{path} is not on a mounted volume of {name}")


def test_tls_component_validates_from_kubernetes_1_37(tls_docs):
    newest = k8s_versions()[-1]
    for d in tls_docs:
        kv_utils.validate(d, newest, strict=True)
    # before 1.37 the API has no grpc.mode: the component documents that floor
    older = [v for v in k8s_versions() if Version(v) < Version("1.37")]
    if Version(newest) >= Version("1.37") and older:
        with pytest.raises(kv_utils.ValidationError):
            kv_utils.validate(get(tls_docs, "StatefulSet", "expert-store"), older[-1], strict=True)


def test_tls_component_wires_certificates_and_tls_probes(tls_docs, capsys):
    docs = tls_docs
    for kind, name in GRPC_SERVICES:
        c = container(docs, kind, name)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"].get("mode") == "TLS", f"{name}.{probe}"
        argv = command_line(docs, c, container_env(docs, {}, c, NAMESPACE))
        parser, args = _cli_parser(argv)
        opts = vars(parser.parse_args(args))
        assert opts["tls_cert"] and opts["tls_key"], name
        cert_vol, cert_key = _mounted_file(docs, kind, name, opts["tls_cert"])
        key_vol, key_key = _mounted_file(docs, kind, name, opts["tls_key"])
        assert (cert_key, key_key) == ("tls.crt", "tls.key")
        assert cert_vol["secret"]["secretName"] == key_vol["secret"]["secretName"]
        assert cert_vol["secret"]["secretName"] == {"expert-store": "adapmoe-store-tls",
                                                    "decoder": "adapmoe-decoder-tls"}[name]
    dec = container(docs, "Deployment", "decoder")
    argv = command_line(docs, dec, container_env(docs, {}, dec, NAMESPACE))
    parser, args = _cli_parser(argv)
    opts = vars(parser.parse_args(args))
    ca_vol, ca_key = _mounted_file(docs, "Deployment", "decoder", opts["store_tls_ca"])
    assert ca_vol["secret"]["secretName"] == "adapmoe-store-tls" and ca_key == "ca.crt"
    # the decoder sees the store's CA, never the store's private key
    assert [i["key"] for i in ca_vol["secret"]["items"]] == ["ca.crt"]
    target = parse_target(opts["store"])
    assert opts["store_tls_server_name"] == f"{target.service}.{NAMESPACE}.svc"
    # the pack Job uploads over TLS the same way: the store's CA only, the Service name
    pack = container(docs, "Job", "expert-store-pack", "pack")
    argv = command_line(docs, pack, container_env(docs, {}, pack, NAMESPACE))
    parser, args = _cli_parser(argv)
    popts = vars(parser.parse_args(args))
    ca_vol, ca_key = _mounted_file(docs, "Job", "expert-store-pack", popts["tls_ca"], "pack")
    assert ca_vol["secret"]["secretName"] == "adapmoe-store-tls" and ca_key == "ca.crt"
    assert [i["key"] for i in ca_vol["secret"]["items"]] == ["ca.crt"]
    assert popts["tls_server_name"] == f"{parse_target(popts['store']).service}.{NAMESPACE}.svc"
    # and so does the calibrate Job (with the decoder's flag names: it is a store client too)
    cal = container(docs, "Job", "expert-store-calibrate", "calibrate")
    argv = command_line(docs, cal, container_env(docs, {}, cal, NAMESPACE))
    parser, args = _cli_parser(argv)
    copts = vars(parser.parse_args(args))
    ca_vol, ca_key = _mounted_file(docs, "Job", "expert-store-calibrate", copts["store_tls_ca"], "calibrate")
    assert ca_vol["secret"]["secretName"] == "adapmoe-store-tls" and ca_key == "ca.crt"
    assert [i["key"] for i in ca_vol["secret"]["items"]] == ["ca.crt"]
    assert copts["store_tls_server_name"] == f"{parse_target(copts['store']).service}.{NAMESPACE}.svc"
    # nothing else changed: same objects as the plain gpu overlay
    plain = {(d["kind"], d["metadata"]["name"]) for d in render("gpu")}
    assert {(d["kind"], d["metadata"]["name"]) for d in docs} == plain
