#!/usr/bin/env bash
# build_carry.sh -- make what gpu_smoke.sh needs on a GPU machine that reaches no registry:
#   site312.tar.xz  packages the GPU machine's image (python 3.12, torch 2.11+cu130, transformers 5.17) lacks
#   toy.tar.xz      the CPU-built toy triple (`mast toy OUT --seed 0`, ~4 min on 2 cores)
# Run on the CPU machine (pip reaches PyPI), from the project's root. Usage: build_carry.sh DEST [TOY_DIR]
#   echo /.gpu_smoke/ >> .git/info/exclude; bash benchmarks/build_carry.sh .gpu_smoke runs/toy
# DEST then holds site312.tar.xz, toy.tar.xz and a copy of benchmarks/gpu_smoke.sh (run it as
# `bash .gpu_smoke/gpu_smoke.sh` on the GPU machine). huggingface_hub is not carried: the image's
# transformers brings it. Versions = what the project's .venv resolved (pyproject has only lower bounds).
set -euo pipefail
DEST=${1:?DEST folder}; TOY=${2:-}
mkdir -p "$DEST"; W=$(mktemp -d)
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64 --platform any"
# shellcheck disable=SC2086
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d "$W/whl" \
  ray==2.60.0 pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
  jsonschema==4.26.0 jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1 tensorboardX==2.6.5 \
  mlflow-skinny==3.17.2 mlflow-tracing==3.17.2 SQLAlchemy==2.1.9 alembic==1.20.1 Mako==1.4.3 \
  cryptography==50.0.2 cffi==2.1.1 pycparser==3.12 sqlparse==0.6.1 cachetools==7.3.3 databricks-sdk==0.162.0 \
  google-auth==2.63.0 pyasn1==0.6.5 pyasn1_modules==0.4.2 fastapi==0.165.0 starlette==1.10.0 uvicorn==0.54.0 \
  GitPython==3.2.1 gitdb==4.0.12 smmap==5.0.3 importlib_metadata==9.1.0 opentelemetry-api==1.45.2 \
  opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2 opentelemetry-semantic-conventions==0.66b2 \
  python-dotenv==1.2.4 math-verify==0.9.0 latex2sympy2_extended==1.11.0 antlr4-python3-runtime==4.13.2 \
  typing_extensions==4.16.0 protobuf==7.36.2
mkdir -p "$W/site312"
for w in "$W"/whl/*.whl; do unzip -q -o "$w" -d "$W/site312"; done
# the full ray wheel is 79 MB, over the 64 MiB that may travel to the GPU machine: drop what a Python-only Tune run
# never loads (Java jar 32 MB, dashboard web UI, RLlib, Serve, ray.llm)
rm -rf "$W"/site312/ray/jars "$W"/site312/ray/dashboard/client/build "$W"/site312/ray/{rllib,serve,llm}
find "$W/site312" -name __pycache__ -prune -exec rm -rf {} +
tar -C "$W" -cf - site312 | xz -T0 -6 > "$DEST/site312.tar.xz"
if [[ -n $TOY ]]; then
  tar -C "$(dirname "$TOY")" -cf - --transform "s,^$(basename "$TOY"),toy," "$(basename "$TOY")" | xz -T0 -6 > "$DEST/toy.tar.xz"
fi
cp "$(dirname "$0")/gpu_smoke.sh" "$DEST/"
rm -rf "$W"
du -ch "$DEST"/* | tail -n 20
