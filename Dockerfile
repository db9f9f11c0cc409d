# syntax=docker/dockerfile:1
# Build stage: compile native addons (better-sqlite3) against Node 22.
FROM node:22-bookworm-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends python3 make g++ && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY package.json package-lock.json .npmrc ./
RUN npm ci --omit=dev
COPY lexicons ./lexicons
COPY src ./src
COPY appview ./appview
COPY console ./console
COPY scripts ./scripts

# Runtime stage: no compilers, runs as the unprivileged node user.
FROM node:22-bookworm-slim
ENV NODE_ENV=production COCORE_MODE=production COCORE_HOST=0.0.0.0 COCORE_DATA_DIR=/data
WORKDIR /app
COPY --from=build /app /app
RUN mkdir -p /data && chown node:node /data
USER node
VOLUME /data
EXPOSE 2584 2585
# A larger young generation: fewer scavenges on the firehose hot path (+6-9% ingest, see docs/benchmarks.md).
CMD ["node", "--max-semi-space-size=64", "scripts/prod.ts"]
