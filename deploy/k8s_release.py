"""A Kubernetes release of one model pair: an image tag that names the models, and the overlay that
deploys exactly that image.

A mutable tag (`:cpu`, `:gpu`) with `imagePullPolicy: IfNotPresent` rolls nothing: the pod spec
does not change, and a node that has the old `:cpu` keeps running it. Here every model pair gets
its own tag, `<variant>-<image version>-<text version>` (e.g. `cpu-v20261130-051736-v20261130-051915`),
so applying a release changes the pod template and the Deployments roll; the previous release's
overlay (or `kubectl rollout undo`) rolls back to the previous image.

    python -m deploy.k8s_release --variant cpu --registry registry.example.com/servable \
        fashion-cnn:latest sentiment-bert:latest        (make k8s-release VARIANT=cpu REGISTRY=...)

prints the commands that bake, build and push that image, then the same command with the pushed
image's digest (`--digest-from podman` reads it with `podman image inspect`, `--digest-from docker`
with docker's; `--digest sha256:...` gives it), which writes deploy/k8s/releases/<tag>/kustomization.yaml:
on top of overlays/<variant>, the image by digest (`<registry>@sha256:...`: what the cluster runs is
exactly the image that was built and pushed, whatever later happens to the tag), the exact model tags
in each Deployment's environment and a change-cause for `kubectl rollout history`. No release is
written without a digest, and `--check DIR` refuses a release whose rendered images are not all
pinned by digest. Tags are given one per served model, in SERVED_MODELS order; `:latest` is resolved
in the local model store (BENTOML_HOME).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from servable.config import SERVED_MODELS

K8S = Path(__file__).resolve().parent / "k8s"
TAG_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
MAX_TAG = 128  # OCI distribution spec
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
PINNED = re.compile(r"[^@\s]+@sha256:[0-9a-f]{64}")  # an image reference by digest


class ReleaseError(RuntimeError):
    """A release that would not pin the image by digest."""


def parse_digest(value: str) -> str:
    """`sha256:<64 hex>`, also accepted as `<name>@sha256:...` (docker's RepoDigests, podman push
    --digestfile); anything else (a tag, a short digest) is refused."""
    digest = value.strip().rpartition("@")[2]
    if not DIGEST.fullmatch(digest):
        raise ReleaseError(f"{value.strip()!r} is not an image digest (sha256:<64 hex digits>): a tag is mutable")
    return digest


def digest_from(engine: str, image: str, registry: str) -> str:
    """The registry digest of a pushed image, from the local engine (`<engine> image inspect`):
    the RepoDigests entry of `registry`. A built but unpushed image has none: push it first."""
    exe = shutil.which(engine)
    if not exe:
        raise ReleaseError(f"{engine} is not installed: give the digest with --digest")
    out = subprocess.run([exe, "image", "inspect", "--format", "{{json .RepoDigests}}", image],
                         capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    if out.returncode != 0:
        raise ReleaseError(f"{engine} image inspect {image}: {out.stderr.strip()[-500:]}")
    found = [d for d in json.loads(out.stdout or "null") or [] if d.partition("@")[0] == registry]
    if not found:
        raise ReleaseError(f"{image} has no digest for {registry}: push it first ({engine} push {image})")
    return parse_digest(found[0])


def unpinned_images(docs: list[dict]) -> list[str]:
    """The container images of rendered manifests that are not referenced by digest."""
    images = []
    for doc in docs:
        pod = (doc.get("spec") or {}).get("template", {}).get("spec", {})
        for container in pod.get("initContainers", []) + pod.get("containers", []):
            images.append(container["image"])
    return [i for i in images if not PINNED.fullmatch(i)]


def check(release: Path) -> list[str]:
    """Render a release overlay (kubectl kustomize) and return its images not pinned by digest."""
    kubectl = shutil.which("kubectl")
    if not kubectl:
        raise ReleaseError("kubectl is not installed: it renders the release to check it")
    out = subprocess.run([kubectl, "kustomize", str(release)], capture_output=True, text=True, timeout=120,
                         check=False)  # fmt: skip
    if out.returncode != 0:
        raise ReleaseError(f"kubectl kustomize {release}: {out.stderr.strip()[-500:]}")
    return unpinned_images([d for d in yaml.safe_load_all(out.stdout) if d])


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


def kustomization(variant: str, registry: str, tag: str, models: dict[str, str], overlay: str, digest: str) -> dict:
    digest = parse_digest(digest)
    cause = f"models {', '.join(models.values())}; image {registry}:{tag}@{digest}"
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
        "images": [{"name": "servable", "newName": registry, "digest": digest}],
        "patches": patches,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variant", choices=["cpu", "gpu"], default="cpu")
    p.add_argument("--registry", default="registry.example.com/servable", help="image name without tag")
    p.add_argument("--out", type=Path, default=K8S / "releases", help="the release overlay goes to OUT/<tag>/")
    pin = p.add_mutually_exclusive_group()
    pin.add_argument("--digest", help="the pushed image's digest, sha256:... (or a file holding it: @FILE)")
    pin.add_argument("--digest-from", choices=["podman", "docker"], help="read the pushed image's digest locally")
    p.add_argument("--check", type=Path, metavar="DIR", help="only check that release DIR pins every image by digest")
    p.add_argument("tags", nargs="*", help=f"one model tag per served model, in this order: {', '.join(SERVED_MODELS)}")
    args = p.parse_args(argv)
    try:
        if args.check:
            unpinned = check(args.check)
            for image in unpinned:
                print(f"{args.check}: image {image} is not pinned by digest (<name>@sha256:...)", file=sys.stderr)
            return 1 if unpinned else 0
        return _release(p, args)
    except ReleaseError as exc:
        print(f"refused: {exc}", file=sys.stderr)
        return 2


def _release(p: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    if len(args.tags) != len(SERVED_MODELS):
        p.error(f"give {len(SERVED_MODELS)} model tags ({', '.join(SERVED_MODELS)}), got {args.tags}")
    models = {kind: resolve(t) for kind, t in zip(SERVED_MODELS, args.tags, strict=True)}
    tag = image_tag(args.variant, list(models.values()))
    image = f"{args.registry}:{tag}"
    this = f"python -m deploy.k8s_release --variant {args.variant} --registry {args.registry} " + " ".join(
        models.values()
    )
    if args.digest is None and args.digest_from is None:  # step 1: the image to build and push
        build = "--build-arg ORT_PACKAGE=onnxruntime" if args.variant == "cpu" else (
            "--build-arg BASE_IMAGE="
            "nvidia/cuda:13.0.3-cudnn-runtime-ubuntu24.04@sha256:14f6d08d1cd4a96effbfe3101d0b56326f552c199d05e4979ee0bd616df5811b"
        )  # fmt: skip
        print(f"image {image}: build and push it, then write the release pinned to its digest:\n"
              f"  make bake-models MODELS=\"{' '.join(models.values())}\"\n"
              f"  podman build --format docker -f deploy/Dockerfile {build} -t {image} .\n"
              f"  podman push {image}\n"
              f"  {this} --digest-from podman        (docker: --digest-from docker)")  # fmt: skip
        return 0
    if args.digest_from:
        digest = digest_from(args.digest_from, image, args.registry)
    elif args.digest.startswith("@"):  # podman push --digestfile FILE
        digest = parse_digest(Path(args.digest[1:]).read_text())
    else:
        digest = parse_digest(args.digest)
    out = args.out / tag
    out.mkdir(parents=True, exist_ok=True)
    header = f"# Release {tag} (python -m deploy.k8s_release): {', '.join(models.values())}; {image}@{digest}\n"
    overlay = os.path.relpath(K8S / "overlays" / args.variant, out.resolve())
    body = yaml.dump(kustomization(args.variant, args.registry, tag, models, overlay, digest), Dumper=_Dumper,
                     sort_keys=False)  # fmt: skip
    (out / "kustomization.yaml").write_text(header + body)
    deployments = " ".join(f"deploy/servable-{kind}" for kind in SERVED_MODELS)
    print(f"wrote {out / 'kustomization.yaml'} ({args.registry}@{digest})\n"
          f"  python -m deploy.k8s_release --check {out}\n"
          f"  kubectl apply -k {out}\n"
          f"  kubectl -n servable rollout status {deployments}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
