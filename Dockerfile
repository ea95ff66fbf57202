# The fleet's image: the project on Ray's own GPU image (the Ray and Python the cluster pins),
# with a CUDA build of torch and the GPU extras, vLLM included. Every node runs it (ray up's
# docker section, every KubeRay pod). Build and push it, then pin its digest in the plan:
#   docker build -t ghcr.io/ORG/rerank-fleet:0.1.0 .
#   docker push ghcr.io/ORG/rerank-fleet:0.1.0
#   rerank-fleet plan INVENTORY.yaml --image ghcr.io/ORG/rerank-fleet@sha256:<digest> --out plan/
# Weights are never baked in: they come from a volume, an object store or the hub (docs/DEPLOY.md).
#
# Two images from one file. The last stage (the default target) serves. The `quantize` stage runs
# the Job that writes AWQ checkpoints into the weights volume: llm-compressor 0.14 needs
# compressed-tensors 0.19, which vLLM 0.33's pin (0.17) excludes, so it cannot live in the serving image.
#   docker build --target quantize -t ghcr.io/ORG/rerank-fleet-quantize:0.1.0 .   (the plan's deployment.quantize_image)

FROM rayproject/ray:2.60.0-py311-gpu AS source
USER root
# ffmpeg libraries for PyAV's video decoding; nothing else beyond the Ray image.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libgl1 ffmpeg \
    && rm -rf /var/lib/apt/lists/*
USER ray
WORKDIR /home/ray/rerank-fleet
COPY --chown=ray:users pyproject.toml README.md ./
COPY --chown=ray:users engine ./engine
COPY --chown=ray:users ranking ./ranking
COPY --chown=ray:users serve ./serve
COPY --chown=ray:users placement ./placement
COPY --chown=ray:users loadtest ./loadtest
COPY --chown=ray:users cli ./cli
COPY --chown=ray:users bench ./bench
COPY --chown=ray:users workshop ./workshop
COPY --chown=ray:users configs ./configs
ENV HF_HUB_DISABLE_TELEMETRY=1 \
    TOKENIZERS_PARALLELISM=false

FROM source AS quantize
RUN pip install --no-cache-dir ".[quant,compress]" "transformers==5.17.0" \
    && python -c "import llmcompressor, torch, engine, workshop.quantize"
HEALTHCHECK NONE

FROM source AS serve
# vLLM 0.33 brings the CUDA torch it was built against; transformers stays on the project's pin
# (the one release llm-compressor 0.14 and vLLM 0.33 both accept).
ARG VLLM_SPEC="vllm==0.33.0"
RUN pip install --no-cache-dir "${VLLM_SPEC}" \
    && pip install --no-cache-dir ".[quant,video,loadtest]" "transformers==5.17.0" \
    && python -c "import ray, torch, vllm, engine, serve; assert ray.__version__ == '2.60.0', ray.__version__"

# Secrets are files mounted at start (/etc/rerank-fleet/secrets on Kubernetes), never layers.

# The Serve proxy answers on 8000. Healthy = this node's raylet answers its dashboard agent (the
# check KubeRay's own probes make); ray up's docker containers use it.
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:52365/api/local_raylet_healthz', timeout=4)" || exit 1
