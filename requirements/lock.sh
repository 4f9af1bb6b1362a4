#!/usr/bin/env bash
# Refreshes the locks in requirements/ from pyproject.toml (`make lock`): exact versions with the
# sha256 of every file PyPI holds for them, one file per install set:
#
#   dev.txt          everything `make setup` installs: serve + train + loadtest + dev (resolved first)
#   serve.txt        the serving image: base dependencies + [serve]   (deploy/Dockerfile, SBOM, audit)
#   onnxruntime.txt  the CPU build of ONNX Runtime at serve.txt's onnxruntime-gpu version (CPU image)
#   train.txt        base + [train]
#   loadtest.txt     base + [loadtest]
#   build.txt        the build backend of pyproject.toml's [build-system] (setuptools), at dev.txt's
#                    version: the image builds the project with it and no build isolation
#
# The subsets are resolved with dev.txt as constraints, so one package has one version in every set.
# torch is left out of all of them: its build (CUDA or CPU, and from which index) depends on the
# machine, and requirements/torch.sh picks it at install time. The locks are resolved against its
# CPU build, so torch's own dependencies are pinned, and no nvidia-* CUDA library is.
#
#   requirements/lock.sh PIP TORCH_VERSION [pip-compile options]   e.g. --upgrade, --upgrade-package bentoml
set -euo pipefail
pip=${1:?usage: lock.sh PIP TORCH_VERSION [pip-compile options]}
torch_version=${2:?usage: lock.sh PIP TORCH_VERSION [pip-compile options]}
shift 2
cd "$(dirname "$0")/.."
bin=$(dirname "$pip")

# The CPU torch and the pip options that reach it: a constraint for the resolver, never a pin.
read -r torch_req torch_opts <<<"$(TORCH_LOCKS=0 requirements/torch.sh "$pip" "$torch_version" cpu)"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
echo "$torch_req" >"$work/torch.txt"

export CUSTOM_COMPILE_COMMAND="make lock"  # the command named in the locks' headers
compile() {
  "$bin/pip-compile" --quiet --generate-hashes --strip-extras --no-emit-index-url --no-emit-find-links \
    --unsafe-package servable --unsafe-package torch --constraint "$work/torch.txt" \
    --pip-args "${torch_opts:-}" "$@"
}

# pip-compile's note on the two names left out reads like an error; say why they are out instead.
explain_unpinned() {
  sed -i -e '/^# WARNING: The following packages were not pinned/,/^# satisfied by a package already installed/c\
# Not pinned on purpose: servable is this project (pip install --no-deps .), and torch is\
# installed for the machine by requirements/torch.sh (CUDA or CPU build).' "$@"
}

compile --all-extras --output-file requirements/dev.txt "$@" pyproject.toml
for set in serve train loadtest; do
  compile --constraint requirements/dev.txt --extra "$set" --output-file "requirements/$set.txt" "$@" pyproject.toml
done
ort=$(sed -n 's/^onnxruntime-gpu==\([^ ]*\).*/\1/p' requirements/serve.txt)
echo "onnxruntime==$ort  # the CPU build at serve.txt's onnxruntime-gpu version (written by lock.sh)" >requirements/onnxruntime.in
compile --constraint requirements/serve.txt --output-file requirements/onnxruntime.txt "$@" requirements/onnxruntime.in
explain_unpinned requirements/{dev,serve,onnxruntime,train,loadtest}.txt
# The build backend: pip-compile calls setuptools "unsafe" to pin; here pinning it is the point.
compile --constraint requirements/dev.txt --allow-unsafe --only-build-deps --build-deps-for wheel \
  --output-file requirements/build.txt "$@" pyproject.toml
sed -i 's/^# The following packages are considered to be unsafe in a requirements file:$/# The build backend, installed before `pip install --no-build-isolation --no-index .`/' requirements/build.txt
echo "locks written: requirements/{dev,serve,onnxruntime,train,loadtest,build}.txt (torch: requirements/torch-*.txt, make lock-torch)"
