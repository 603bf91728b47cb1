"""infra/: the cluster YAMLs parse and satisfy their schemas; the container pins every dependency."""

import re
import tomllib
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).parent.parent
INFRA = ROOT / "infra"

CONTAINERS = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["name", "image"],
    "properties": {"name": {"type": "string"}, "image": {"type": "string", "pattern": ":[^:]+$"}}}}
POD = {"type": "object", "required": ["spec"], "properties": {
    "spec": {"type": "object", "required": ["containers"], "properties": {"containers": CONTAINERS}}}}
HEAD = {"type": "object", "required": ["rayStartParams", "template"],
        "properties": {"rayStartParams": {"type": "object", "properties": {"dashboard-host": {"const": "127.0.0.1"}},
                                          "required": ["dashboard-host"]},
                       "template": POD}}
WORKERS = {"type": "array", "minItems": 1, "items": {
    "type": "object", "required": ["groupName", "replicas", "minReplicas", "maxReplicas", "rayStartParams", "template"],
    "properties": {"groupName": {"type": "string"}, "replicas": {"type": "integer", "minimum": 0},
                   "minReplicas": {"type": "integer", "minimum": 0}, "maxReplicas": {"type": "integer", "minimum": 1},
                   "template": POD}}}
CLUSTER_SPEC = {"type": "object", "required": ["rayVersion", "headGroupSpec", "workerGroupSpecs"],
                "properties": {"rayVersion": {"type": "string"}, "headGroupSpec": HEAD, "workerGroupSpecs": WORKERS}}
RAYCLUSTER = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
    "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayCluster"},
    "metadata": {"type": "object", "required": ["name"]}, "spec": CLUSTER_SPEC}}
RAYJOB = {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "properties": {
    "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"},
    "metadata": {"type": "object", "required": ["name"]},
    "spec": {"type": "object", "required": ["entrypoint", "rayClusterSpec"],
             "properties": {"entrypoint": {"type": "string", "pattern": "^python -m jobs.sweep "},
                            "shutdownAfterJobFinishes": {"type": "boolean"}, "rayClusterSpec": CLUSTER_SPEC}}}}
AUTOSCALER = {"type": "object", "required": ["cluster_name", "max_workers", "provider", "available_node_types",
                                             "head_node_type", "head_start_ray_commands", "worker_start_ray_commands"],
              "properties": {
                  "cluster_name": {"type": "string"}, "max_workers": {"type": "integer", "minimum": 1},
                  "provider": {"type": "object", "required": ["type", "region"]},
                  "available_node_types": {"type": "object", "minProperties": 2, "additionalProperties": {
                      "type": "object", "required": ["resources", "node_config"],
                      "properties": {"resources": {"type": "object"}, "min_workers": {"type": "integer"},
                                     "max_workers": {"type": "integer"}}}},
                  "head_node_type": {"type": "string"},
                  "head_start_ray_commands": {"type": "array", "items": {"type": "string"}},
                  "worker_start_ray_commands": {"type": "array", "items": {"type": "string"}}}}


def load(path):
    return yaml.safe_load((INFRA / path).read_text())


def check_groups(spec):
    for group in spec["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], group["groupName"]


def test_kuberay_manifests():
    cluster = load("kuberay/raycluster.yaml")
    jsonschema.validate(cluster, RAYCLUSTER)
    check_groups(cluster["spec"])
    job = load("kuberay/rayjob.yaml")
    jsonschema.validate(job, RAYJOB)
    check_groups(job["spec"]["rayClusterSpec"])
    sweep = job["spec"]["entrypoint"].split()[3]
    assert (ROOT / sweep).is_file(), sweep  # the job runs a sweep that exists
    yaml.safe_load(job["spec"]["runtimeEnvYAML"])


def test_autoscaler_config():
    config = load("ray/cluster-aws-gpu.yaml")
    jsonschema.validate(config, AUTOSCALER)
    assert config["head_node_type"] in config["available_node_types"]
    assert any("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"])
    gpu_types = [t for t in config["available_node_types"].values() if t["resources"].get("GPU", 0) > 0]
    assert gpu_types and sum(t["max_workers"] for t in gpu_types) <= config["max_workers"]


def test_container_pins_every_dependency():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    pins = dict(re.findall(r'"?([A-Za-z0-9_.\-]+)(?:\[[a-z,]+\])?==([0-9][^\s"\\]*)', text))
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    names = [re.split(r"[<>=\[ ;]", d, maxsplit=1)[0].lower() for d in deps]
    missing = [n for n in names if n not in {k.lower() for k in pins}]
    assert not missing, f"not pinned in the Dockerfile: {missing}"
    assert pins["torch"] == "2.13.0"
