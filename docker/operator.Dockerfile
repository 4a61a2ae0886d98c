# The Baton operator: kopf + the baton_operator package. No model, no torch.
# Build from the repository root:  docker build -f docker/operator.Dockerfile -t baton-operator .
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# The operator's runtime dependencies (pyproject's `operator` extra plus what it imports).
RUN pip install \
        "kopf>=1.37" "kubernetes>=29" "pyyaml>=6.0" \
        "opentelemetry-api>=1.25" "opentelemetry-sdk>=1.25" "opentelemetry-exporter-otlp-proto-http>=1.25"

COPY operator/baton_operator /opt/baton/baton_operator
# The one statistics module the rollout gates share with the sidecar's A/B report (pure Python).
COPY baton_sidecar/__init__.py baton_sidecar/stats.py /opt/baton/baton_sidecar/
ENV PYTHONPATH=/opt/baton

# Non-root, numeric so that runAsNonRoot can verify it.
RUN groupadd --system --gid 10001 baton && useradd --system --uid 10001 --gid 10001 --no-create-home baton
USER 10001:10001

EXPOSE 8081
ENTRYPOINT ["kopf"]
CMD ["run", "--standalone", "--all-namespaces", "--liveness=http://0.0.0.0:8081/healthz", "-m", "baton_operator"]
