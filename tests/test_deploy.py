"""cluster/deploy/ checked as far as a machine without a cloud or Kubernetes allows: the `ray up` YAML against Ray's
own cluster-launcher schema, the install script's torch pin per CUDA (with a stand-in nvidia-smi), the cluster
config through cluster/config.py, the KubeRay RayJob's entrypoint resolving to jobs.batch_infer with arguments it
accepts, the RayService's serveConfigV2 against cluster/deploy/serve.yaml, and a `serve build` round trip."""
import json
import os
import shlex
import subprocess
import sys

import pytest
import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(ROOT, "cluster", "deploy")
APP_DIR = "/home/ray/moe-expert-cluster"          # where the Dockerfile puts the project in the image


def load(name):
    with open(os.path.join(DEPLOY, name)) as f:
        return yaml.safe_load(f)


def ray_pin() -> str:
    import re
    text = open(os.path.join(ROOT, "pyproject.toml")).read()
    return re.search(r'"ray\[[^\]]*\]==([0-9.]+)"', text).group(1)


def test_launcher_yaml_validates_against_rays_schema():
    import jsonschema
    import ray
    from ray.autoscaler._private.util import prepare_config, validate_config
    cfg = load("cluster.yaml")
    with open(os.path.join(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json")) as f:
        schema = json.load(f)
    jsonschema.validate(cfg, schema)
    validate_config(prepare_config(cfg))             # what `ray up` runs: defaults filled in, then the schema
    gpu = [t for t in cfg["available_node_types"].values() if t["resources"].get("GPU")]
    assert gpu and all(t["max_workers"] >= 1 for t in gpu)
    assert cfg["head_node_type"] in cfg["available_node_types"]
    # the setup installs the project with the repository's own script, from the synced copy
    setup = " ".join(cfg["setup_commands"])
    assert "cluster/deploy/install.sh" in setup and list(cfg["file_mounts"].values()) == ["."]
    assert any("--dashboard-host=0.0.0.0" in c for c in cfg["head_start_ray_commands"])


@pytest.mark.parametrize("cuda, flavour", [("12.6", "cu126"), ("12.8", "cu128"), ("12.9", "cu128"),
                                           ("13.0", "cu130"), (None, "cpu"), ("12.2", None)])
def test_install_script_pins_torch_per_cuda(tmp_path, cuda, flavour):
    bindir = tmp_path / "bin"
    bindir.mkdir()
    path = "/usr/bin:/bin"
    if cuda:  # a stand-in nvidia-smi printing the banner line the script parses
        smi = bindir / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\necho '| NVIDIA-SMI 570.00   Driver Version: 570.00   CUDA Version: {cuda}     |'\n")
        smi.chmod(0o755)
        path = f"{bindir}:{path}"
    p = subprocess.run(["bash", os.path.join(DEPLOY, "install.sh"), "/opt/app"], capture_output=True, text=True,
                       env={"PATH": path, "DRY_RUN": "1", "PYTHON": "python3"}, timeout=30)
    if flavour is None:
        assert p.returncode != 0 and "older than 12.6" in p.stderr
        return
    assert p.returncode == 0, p.stderr
    torch_pin = open(os.path.join(ROOT, "Makefile")).read().split("torch==")[1].split(";")[0].strip()
    assert p.stdout.splitlines() == [
        f"python3 -m pip install -q torch=={torch_pin} --index-url https://download.pytorch.org/whl/{flavour}",
        "python3 -m pip install -q -e /opt/app"]


def test_install_script_refuses_unknown_flavour():
    p = subprocess.run(["bash", os.path.join(DEPLOY, "install.sh")], capture_output=True, text=True,
                       env={"PATH": "/usr/bin:/bin", "DRY_RUN": "1", "TORCH_CUDA": "cu999"}, timeout=30)
    assert p.returncode != 0 and "TORCH_CUDA=cu999" in p.stderr


def test_cluster_config_is_valid_and_matches_the_clusters():
    from cluster.config import load_config
    cfg = load_config(os.path.join(DEPLOY, "ray_config.cluster.yaml"))
    assert cfg.ray.address == "auto" and cfg.workers.num_gpus_per_worker == 1 and cfg.workers.device == "cuda"
    # one ExpertWorker per GPU the clusters can have
    launcher_gpus = sum(t.get("max_workers", 0) * t["resources"].get("GPU", 0)
                        for t in load("cluster.yaml")["available_node_types"].values())
    for spec in (load("rayjob.yaml")["spec"]["rayClusterSpec"], load("rayservice.yaml")["spec"]["rayClusterConfig"]):
        k8s_gpus = sum(g["maxReplicas"] * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]
                                               .get("nvidia.com/gpu", 0)) for g in spec["workerGroupSpecs"])
        assert k8s_gpus == launcher_gpus == cfg.workers.count


def check_ray_cluster_spec(spec, image):
    import ray
    assert spec["rayVersion"] == ray.__version__ == ray_pin()
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    [hc] = head["template"]["spec"]["containers"]
    assert hc["image"] == image and "nvidia.com/gpu" not in hc["resources"]["limits"]
    assert spec["workerGroupSpecs"]
    for g in spec["workerGroupSpecs"]:
        assert g["groupName"] and 0 < g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]
        [wc] = g["template"]["spec"]["containers"]
        assert wc["image"] == image
        assert int(wc["resources"]["limits"]["nvidia.com/gpu"]) >= 1, "GPU workers need a GPU limit"


def dockerfile_image_check():
    """The image Ray runs in KubeRay: Ray's own image of the pinned version and our Python."""
    [frm] = [l for l in open(os.path.join(DEPLOY, "Dockerfile")) if l.startswith("FROM ")]
    assert frm.split()[1] == f"rayproject/ray:{ray_pin()}-py{sys.version_info.major}{sys.version_info.minor}-gpu"
    assert f"WORKDIR {APP_DIR}" in open(os.path.join(DEPLOY, "Dockerfile")).read()


def test_rayjob_runs_batch_infer_with_arguments_it_accepts():
    from cluster.config import load_config
    from jobs.batch_infer import make_parser
    job = load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "jobs.batch_infer"]
    assert os.path.isfile(os.path.join(ROOT, "jobs", "batch_infer.py"))     # the module resolves in this repo
    args = make_parser().parse_args(argv[3:])                               # every flag is one it knows
    assert args.input and args.output and args.max_batch >= 1
    assert args.config.startswith(APP_DIR + "/")
    cfg = load_config(os.path.join(ROOT, os.path.relpath(args.config, APP_DIR)))
    assert yaml.safe_load(job["spec"]["runtimeEnvYAML"]) == cfg.ray.runtime_env
    check_ray_cluster_spec(job["spec"]["rayClusterSpec"], "registry.example.com/moe-expert-cluster:0.1.0")
    dockerfile_image_check()


# what the RayService may change in serve.yaml, and nothing else
K8S_OVERRIDES = {"http_options.host": "0.0.0.0",
                 "applications.0.import_path": "jobs.serve_app:build_app",
                 "applications.0.args": {"config": "cluster/deploy/ray_config.cluster.yaml"}}


def _apply(cfg, overrides):
    import copy
    cfg = copy.deepcopy(cfg)
    for path, value in overrides.items():
        node, keys = cfg, path.split(".")
        for k in keys[:-1]:
            node = node[int(k)] if isinstance(node, list) else node[k]
        node[keys[-1]] = value
    return cfg


def test_rayservice_embeds_serve_yaml():
    if not os.path.exists(os.path.join(DEPLOY, "serve.yaml")):
        pytest.skip("cluster/deploy/serve.yaml not written yet")
    from ray.serve.schema import ServeDeploySchema
    svc = load("rayservice.yaml")
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService" and svc["metadata"]["name"]
    embedded = yaml.safe_load(svc["spec"]["serveConfigV2"])
    assert embedded == _apply(load("serve.yaml"), K8S_OVERRIDES), \
        "rayservice.yaml's serveConfigV2 drifted from cluster/deploy/serve.yaml (beyond the KubeRay overrides)"
    ServeDeploySchema.model_validate(embedded)
    check_ray_cluster_spec(svc["spec"]["rayClusterConfig"], "registry.example.com/moe-expert-cluster:0.1.0")
    ports = {p["name"]: p["containerPort"]
             for p in svc["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]}
    assert ports["serve"] == embedded["http_options"]["port"]
    if os.path.exists(os.path.join(ROOT, "jobs", "serve_app.py")):
        from jobs.serve_app import build_app
        build_app(embedded["applications"][0]["args"])   # the args are ones the app's builder accepts


def test_serve_build_round_trip(tmp_path):
    """`serve build jobs.serve_app:app` writes the config Serve derives from the code; serve.yaml must name the same
    app and agree with it on every deployment option both set."""
    if not os.path.exists(os.path.join(ROOT, "jobs", "serve_app.py")):
        pytest.skip("jobs/serve_app.py not written yet")
    out = tmp_path / "built.yaml"
    p = subprocess.run([os.path.join(os.path.dirname(sys.executable), "serve"), "build", "jobs.serve_app:app",
                        "-o", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=180,
                       env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
    assert p.returncode == 0, p.stderr[-2000:]
    built = yaml.safe_load(out.read_text())
    mine = load("serve.yaml")
    [b_app] = built["applications"]
    [m_app] = mine["applications"]
    assert b_app["import_path"] == m_app["import_path"] == "jobs.serve_app:app"
    b_deps = {d["name"]: d for d in b_app["deployments"]}
    for d in m_app["deployments"]:
        assert d["name"] in b_deps, f"serve.yaml configures {d['name']}, which the app does not have"
        shared = set(d) & set(b_deps[d["name"]]) - {"name"}
        assert shared, d
        for k in shared:
            assert _norm(d[k]) == _norm(b_deps[d["name"]][k]), (d["name"], k, d[k], b_deps[d["name"]][k])


def _norm(v):
    """Numbers as floats (serve build writes 1.0 where the YAML says 1), recursively."""
    if isinstance(v, dict):
        return {k: _norm(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_norm(x) for x in v]
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
