FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip install --no-cache-dir . && useradd --system --uid 10001 aup
COPY policies ./policies
COPY specs ./specs
COPY deploy ./deploy
USER aup
EXPOSE 8443 9901
ENTRYPOINT ["aup-gateway"]
CMD ["serve", "--config", "deploy/gateway.compose.yaml"]
