FROM python:3.11-slim
WORKDIR /app
# Runtime dependencies exactly as requirements-runtime.lock pins them, each file checked against
# its hash (`make lock` writes it; docs/development.md). The gateway itself goes in without
# dependencies, so nothing unpinned can slip in with it.
COPY requirements-runtime.lock ./
RUN pip install --no-cache-dir --require-hashes -r requirements-runtime.lock
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir --no-deps . && useradd --system --uid 10001 aup
COPY policies ./policies
COPY specs ./specs
COPY deploy ./deploy
USER aup
EXPOSE 8443 9901
ENTRYPOINT ["aup-gateway"]
CMD ["serve", "--config", "deploy/gateway.compose.yaml"]
