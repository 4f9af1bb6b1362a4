"""A Kubernetes release of one model pair: an image tag that names the models, and the overlay that
deploys exactly that image.

A mutable tag (`:cpu`, `:gpu`) with `imagePullPolicy: IfNotPresent` rolls nothing: the pod spec
does not change, and a node that has the old `:cpu` keeps running it. Here every model pair gets
its own tag, `<variant>-<image version>-<text version>` (e.g. `cpu-v20261130-051736-v20261130-051915`),
so applying a release changes the pod template and the Deployments roll; the previous release's
overlay (or `kubectl rollout undo`) rolls back to the previous image.

    python -m deploy.k8s_release --variant cpu --registry registry.example.com/servable \
        fashion-cnn:latest sentiment-bert:latest        (make k8s-release VARIANT=cpu REGISTRY=...)

writes deploy/k8s/releases/<tag>/kustomization.yaml (on top of overlays/<variant>: the image, the
exact model tags in each Deployment's environment, a change-cause for `kubectl rollout history`)
and prints the commands that bake, build, push and apply it. Tags are given one per served model,
in SERVED_MODELS order; `:latest` is resolved in the local model store (BENTOML_HOME).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import sys
from pathlib import Path

import yaml

from servable.config import SERVED_MODELS

K8S = Path(__file__).resolve().parent / "k8s"
TAG_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
MAX_TAG = 128  # OCI distribution spec


def resolve(tag: str) -> str:
    """name:version with `latest` (or no version) replaced by the version it points at."""
    name, _, version = tag.partition(":")
    if version and version != "latest":
        return tag
    import bentoml  # only to read the store

    return str(bentoml.models.get(f"{name}:latest").tag)


def image_tag(variant: str, model_tags: list[str]) -> str:
    """`<variant>-<version>-<version>...`: unique per model pair, a valid OCI tag."""
    versions = [TAG_CHARS.sub("_", t.partition(":")[2]) for t in model_tags]
    tag = "-".join([variant, *versions])
    if len(tag) > MAX_TAG:  # long user-given versions: keep it unique with a digest of the pair
        tag = f"{variant}-{hashlib.sha256(' '.join(model_tags).encode()).hexdigest()[:16]}"
    return tag


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the patches) as literal blocks, so the overlay reads like a hand-written one."""


_Dumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None)
)


def kustomization(variant: str, registry: str, tag: str, models: dict[str, str], overlay: str) -> dict:
    cause = f"models {', '.join(models.values())}; image {registry}:{tag}"
    patches = []
    for kind, entry in SERVED_MODELS.items():
        container = {"name": kind, "env": [{"name": f"{entry.env_prefix}MODEL_TAG", "value": models[kind]}]}
        patch = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": f"servable-{kind}", "annotations": {"kubernetes.io/change-cause": cause}},
            "spec": {"template": {"spec": {"containers": [container]}}},
        }
        patches.append({"target": {"kind": "Deployment", "name": f"servable-{kind}"},
                        "patch": yaml.safe_dump(patch, sort_keys=False)})  # fmt: skip
    return {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [overlay],
        "images": [{"name": "servable", "newName": registry, "newTag": tag}],
        "patches": patches,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--registry", default="registry.example.com/servable", help="image name without tag")
    p.add_argument("--out", type=Path, default=K8S / "releases", help="the release overlay goes to OUT/<tag>/")
    p.add_argument("tags", nargs="*", help=f"one model tag per served model, in this order: {', '.join(SERVED_MODELS)}")
    args = p.parse_args(argv)
    if len(args.tags) != len(SERVED_MODELS):
        p.error(f"give {len(SERVED_MODELS)} model tags ({', '.join(SERVED_MODELS)}), got {args.tags}")
    models = {kind: resolve(t) for kind, t in zip(SERVED_MODELS, args.tags, strict=True)}
    tag = image_tag(args.variant, list(models.values()))
    out = args.out / tag
    out.mkdir(parents=True, exist_ok=True)
    header = f"# Release {tag} (python -m deploy.k8s_release): {', '.join(models.values())}\n"
    overlay = os.path.relpath(K8S / "overlays" / args.variant, out.resolve())
    body = yaml.dump(kustomization(args.variant, args.registry, tag, models, overlay), Dumper=_Dumper, sort_keys=False)
    (out / "kustomization.yaml").write_text(header + body)
    build = "--build-arg ORT_PACKAGE=onnxruntime" if args.variant == "cpu" else (
        "--build-arg BASE_IMAGE="
        "nvidia/cuda:13.0.3-cudnn-runtime-ubuntu24.04@sha256:14f6d08d1cd4a96effbfe3101d0b56326f552c199d05e4979ee0bd616df5811b"
    )  # fmt: skip
    deployments = " ".join(f"deploy/servable-{kind}" for kind in SERVED_MODELS)
    print(f"wrote {out / 'kustomization.yaml'}\n"
          f"  make bake-models MODELS=\"{' '.join(models.values())}\"\n"
          f"  docker build -f deploy/Dockerfile {build} -t {args.registry}:{tag} .\n"
          f"  docker push {args.registry}:{tag}\n"
          f"  kubectl apply -k {out}\n"
          f"  kubectl -n servable rollout status {deployments}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
