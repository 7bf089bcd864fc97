# diskconv: API (`serve`, the default) or conversion worker (`worker`) in one image.
# Build: docker build -t diskconv .   Run: see docker-compose.yml and the README.

# --- build: compile TypeScript, then keep only production dependencies
# Node 24 LTS (Node 20 reached its end of life in April 2026); Debian, whose ceph-common gives workers `rbd`.
FROM node:24-bookworm-slim AS build
# node-gyp builds native/ (SEEK_DATA/SEEK_HOLE; native/codec: clusters decoded with libdeflate and libzstd);
# zstd-napi is optional (Node 24 decodes zstd with node:zlib).
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends python3 make g++ libdeflate-dev libzstd-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY package.json package-lock.json ./
COPY native ./native
RUN npm ci --no-audit --no-fund
COPY tsconfig.json ./
COPY src ./src
# The build's last step: the image verbs bundled with a V8 code cache made by this Node (src/cli/launch.cts).
COPY scripts/bundle-cli.mjs ./scripts/
RUN npm run build && npm prune --omit=dev && find dist -name '*.map' -delete && find dist -name '*.d.ts' -delete

# --- runtime: node, the compiled code, production node_modules; no compiler, no tests
FROM node:24-bookworm-slim
# rbd (ceph-common) for RBD targets and zero-copy Glance publishing; the workers read CEPH_CONF/CEPH_ARGS.
# libdeflate0 and libzstd1: the libraries native/codec links.
RUN apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ceph-common ca-certificates libdeflate0 libzstd1 \
 && rm -rf /var/lib/apt/lists/*
ENV NODE_ENV=production \
    HOST=0.0.0.0 \
    PORT=8080 \
    DATA_DIR=/data
WORKDIR /app
COPY --from=build /app/package.json ./
COPY --from=build /app/node_modules ./node_modules
COPY --from=build /app/dist ./dist
COPY --from=build /app/native ./native
COPY openapi.yaml ./
COPY web ./web
# The image's own unprivileged user (uid 1000) owns the data directory; a new named
# volume mounted there inherits that ownership.
RUN mkdir -p /data && chown node:node /data
USER node
VOLUME ["/data"]
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s \
  CMD node -e "fetch('http://127.0.0.1:'+(process.env.PORT||8080)+'/healthz').then(r=>process.exit(r.ok?0:1),()=>process.exit(1))" || exit 1
ENTRYPOINT ["node", "dist/cli.js"]
CMD ["serve"]
