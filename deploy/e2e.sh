#!/usr/bin/env bash
# End to end, in containers: build both images, then run deploy/docker-compose.yml for a coordinator
# and three hospitals on small generated datasets, and check the result.
#
#   sudo deploy/e2e.sh            (root: rootful podman; prints one `e2e: error: ...` line on failure)
#
# Steps: podman state in $LEUK_E2E_WORK/podman (containers.conf + storage.conf: nothing outside that
# folder); the base image (deploy/make-base.sh when it is local/bookworm-python:1 and missing); the
# wheelhouse (deploy/wheelhouse.py: CPU torch, builds offline); both images; the coordinator's CA;
# each hospital's key pair made by that hospital's image (`leuk-client keygen`), registered by the
# coordinator (`leuk certs add-site`), the hospital bundle copied back; a generated dataset per
# hospital (common/synthetic.py, never real images); each hospital's approval (`leuk-client approve`
# through `podman-compose run`); `podman-compose up` until the coordinator exits; then: the model was
# exported, every round heard from 3 sites, each hospital's audit log verifies. Containers, the network
# and the two images are removed at the end (the base image and the wheelhouse stay as a cache).
#
# Environment: LEUK_E2E_WORK (default /var/tmp/leukfed-e2e), LEUK_E2E_BASE (default
# local/bookworm-python:1; python:3.11-slim where a registry is reachable), LEUK_E2E_ROUNDS (2),
# LEUK_E2E_TIMEOUT (seconds for the federation, 900), LEUK_E2E_FLWR (the images' flwr release; default
# this machine's, else 1.41.0), LEUK_E2E_KEEP_IMAGES=1 (keep the images: a rerun
# then builds nothing), LEUK_E2E_KEEP_RUN=1 (keep certs, data and state of the run).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
WORK=${LEUK_E2E_WORK:-/var/tmp/leukfed-e2e}
BASE=${LEUK_E2E_BASE:-local/bookworm-python:1}
ROUNDS=${LEUK_E2E_ROUNDS:-2}
TIMEOUT=${LEUK_E2E_TIMEOUT:-900}
SITES=(h1 h2 h3)
LEUK_UID=10001  # the images' `leuk` user owns the mounted folders
SERVER_IMAGE=leukfed-server:0.1.0
CLIENT_IMAGE=leukfed-client:0.1.0
PROJECT=leukfed-e2e-$$
RUN=$WORK/run-$$
LOGS=$WORK/logs
COMPOSE=(podman-compose -p "$PROJECT" -f "$ROOT/deploy/docker-compose.yml")

fail() { echo "e2e: error: $*" >&2; exit 1; }
say() { echo "e2e: $*"; }
elapsed() { echo $(( $(date +%s) - $1 )); }

preflight() {
    [ "$(id -u)" = 0 ] || fail "run as root (rootful podman)"
    command -v podman >/dev/null || fail "podman not found (Debian: apt-get install podman)"
    command -v runc >/dev/null || fail "runc not found (Debian: apt-get install runc; Debian's podman brings crun only)"
    command -v podman-compose >/dev/null || fail "podman-compose not found (pip install podman-compose)"
    command -v python3 >/dev/null || fail "python3 not found"
    mkdir -p "$WORK/podman"/{storage,run,tmp,networks} "$LOGS"
}

# All podman state in $WORK/podman. Each setting fixed a real failure (docs/containers-offline.md):
# ulimits at most the hard limit, runc (crun refuses hybrid cgroups), cgroupfs and file events (no systemd).
podman_env() {
    local hard; hard=$(ulimit -Hn)
    cat > "$WORK/podman/containers.conf" <<EOF
[containers]
default_ulimits = ["nofile=$hard:$hard", "nproc=32768:32768"]
[network]
network_config_dir = "$WORK/podman/networks"
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$WORK/podman/events.log"
tmp_dir = "$WORK/podman/tmp"
EOF
    cat > "$WORK/podman/storage.conf" <<EOF
[storage]
driver = "overlay"
graphroot = "$WORK/podman/storage"
runroot = "$WORK/podman/run"
EOF
    export CONTAINERS_CONF=$WORK/podman/containers.conf CONTAINERS_STORAGE_CONF=$WORK/podman/storage.conf
    podman info >"$LOGS/podman-info.txt" 2>&1 || fail "podman does not start: $(tail -n 1 "$LOGS/podman-info.txt")"
}

base_image() {
    podman image exists "$BASE" && return
    [ "$BASE" = local/bookworm-python:1 ] || podman pull "$BASE" >"$LOGS/pull.log" 2>&1 \
        || fail "base image $BASE not found and not pullable"
    podman image exists "$BASE" && return
    command -v debootstrap >/dev/null || fail "debootstrap not found for the local base (apt-get install debootstrap)"
    "$ROOT/deploy/make-base.sh" "$BASE" "$WORK/base" >"$LOGS/base.log" 2>&1 \
        || fail "could not make the base image $BASE: $(tail -n 1 "$LOGS/base.log")"
    say "$(tail -n 1 "$LOGS/base.log")"
}

wheelhouse() {
    # The images get this machine's tested flwr release when it has one (its pins fit that release only).
    FLWR=${LEUK_E2E_FLWR:-$(python3 -c "import flwr; print(flwr.__version__)" 2>/dev/null || echo 1.41.0)}
    if ls "$ROOT"/deploy/wheelhouse/torch-*.whl "$ROOT"/deploy/wheelhouse/flwr-"$FLWR"-*.whl >/dev/null 2>&1; then
        return
    fi
    local start; start=$(date +%s)
    local pins=()
    # Pin the versions of this machine's tested environment when it has leukfed's dependencies.
    if python3 -c "import flwr, torch, timm" 2>/dev/null; then
        python3 -m pip freeze >"$WORK/constraints.txt" 2>/dev/null && pins=(--constraints "$WORK/constraints.txt")
    fi
    python3 "$ROOT/deploy/wheelhouse.py" --flwr "$FLWR" "${pins[@]}" >"$LOGS/wheelhouse.log" 2>&1 \
        || fail "wheelhouse: $(grep -m1 -E 'error' "$LOGS/wheelhouse.log" || tail -n 1 "$LOGS/wheelhouse.log")"
    say "wheelhouse made in $(elapsed "$start") s: $(tail -n 1 "$LOGS/wheelhouse.log")"
}

build() {  # build NAME IMAGE
    local start; start=$(date +%s)
    podman build --format docker --layers --ignorefile "$ROOT/.dockerignore" -f "$ROOT/deploy/Dockerfile.$1" \
        --build-arg BASE="$BASE" --build-arg TORCH_INDEX= --build-arg FLWR_VERSION="$FLWR" -t "$2" "$ROOT" >"$LOGS/build-$1.log" 2>&1 \
        || fail "building $2 failed: $(tail -n 1 "$LOGS/build-$1.log") (log: $LOGS/build-$1.log)"
    say "built $2 in $(elapsed "$start") s, $(podman image inspect --format '{{.Size}}' "$2" 2>/dev/null | awk '{printf "%.0f MB", $1/1e6}')"
}

in_image() {  # in_image IMAGE ENTRYPOINT [podman run options...] -- ARGS...
    local image=$1 entrypoint=$2; shift 2
    local opts=()
    while [ "$1" != -- ]; do opts+=("$1"); shift; done; shift
    podman run --rm --no-healthcheck --network none --user "$LEUK_UID:$LEUK_UID" "${opts[@]}" --entrypoint "$entrypoint" "$image" "$@"
}

certificates_and_data() {
    mkdir -p "$RUN/coordinator/inbox" "$RUN/state"
    for site in "${SITES[@]}"; do mkdir -p "$RUN/$site" "$RUN/state/$site/home"; done
    mkdir -p "$RUN/state/coordinator/home"
    chown -R "$LEUK_UID:$LEUK_UID" "$RUN"
    local coordinator=(-v "$RUN/coordinator:/work")
    in_image "$SERVER_IMAGE" leuk "${coordinator[@]}" -- certs init --out /work/certs --server-name coordinator,localhost \
        >"$LOGS/certs.log" 2>&1 || fail "leuk certs init: $(tail -n 1 "$LOGS/certs.log")"
    local seed=0
    for site in "${SITES[@]}"; do
        # The hospital makes its key pair; only site.pub travels to the coordinator.
        in_image "$CLIENT_IMAGE" leuk-client -v "$RUN/$site:/site" -- keygen --out /site/keys --site "$site" \
            >>"$LOGS/certs.log" 2>&1 || fail "leuk-client keygen ($site): $(tail -n 1 "$LOGS/certs.log")"
        cp "$RUN/$site/keys/site.pub" "$RUN/coordinator/inbox/$site-site.pub"
        in_image "$SERVER_IMAGE" leuk "${coordinator[@]}" -- certs add-site "$site" --out /work/certs \
            --public-key "/work/inbox/$site-site.pub" >>"$LOGS/certs.log" 2>&1 \
            || fail "leuk certs add-site $site: $(tail -n 1 "$LOGS/certs.log")"
        seed=$((seed + 1))
        in_image "$CLIENT_IMAGE" python -v "$RUN/$site:/site" -- -c \
            "from leukfed.common.synthetic import make_synthetic_dataset as m; m('/site/data', per_class=24, size=32, seed=$seed)" \
            >>"$LOGS/data.log" 2>&1 || fail "generating $site's dataset: $(tail -n 1 "$LOGS/data.log")"
    done
    # The coordinator's hospital bundle (public files only) goes to every hospital, after the last add-site.
    for site in "${SITES[@]}"; do
        cp "$RUN/coordinator/certs/hospital-bundle/ca.crt" "$RUN/$site/keys/"
        cp -r "$RUN/coordinator/certs/hospital-bundle/peers" "$RUN/$site/keys/"
        chown -R "$LEUK_UID:$LEUK_UID" "$RUN/$site/keys"
    done
    rm -rf "$RUN/coordinator/inbox"
    say "CA, 3 hospital-made site keys registered, 3 generated datasets ($(find "$RUN/h1/data" -name '*.png' | wc -l) images each)"
}

federation() {
    export LEUK_UID LEUK_GID=$LEUK_UID LEUK_CERTS=$RUN/coordinator/certs LEUK_STATE=$RUN/state \
           LEUK_MODEL=tinycnn LEUK_ROUNDS=$ROUNDS
    LEUK_PORT=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
    export LEUK_PORT
    local site upper
    for site in "${SITES[@]}"; do
        upper=${site^^}
        export "${upper}_SITE=$RUN/$site/keys" "${upper}_DATA=$RUN/$site/data"
    done
    for site in "${SITES[@]}"; do
        "${COMPOSE[@]}" run --rm --no-deps "hospital-$site" approve --approvals /state/approvals.json \
            --reviewer "reviewer of $site" --note "e2e" --yes >>"$LOGS/approve.log" 2>&1 \
            || fail "approval at $site: $(tail -n 1 "$LOGS/approve.log")"
    done
    say "code approved at ${SITES[*]}; starting the federation ($ROUNDS rounds)"
    local start; start=$(date +%s)
    # The coordinator first; the hospitals once it has registered their keys (a site that dials in
    # before is refused, code 2004). podman < 4.6 cannot wait for `condition: service_healthy`.
    "${COMPOSE[@]}" up -d --no-build coordinator >"$LOGS/compose-up.log" 2>&1 \
        || fail "podman-compose up coordinator: $(tail -n 1 "$LOGS/compose-up.log")"
    local coordinator; coordinator=$(container coordinator)
    [ -n "$coordinator" ] || fail "no coordinator container (log: $LOGS/compose-up.log)"
    local sites_json=$RUN/state/coordinator/run/superlink/sites.json
    until [ "$(registered_sites "$sites_json")" = "${#SITES[@]}" ]; do
        [ "$(podman inspect -f '{{.State.Running}}' "$coordinator" 2>/dev/null)" = true ] \
            || fail "the coordinator stopped before registering the sites: $(podman logs --tail 1 "$coordinator" 2>&1)"
        [ "$(elapsed "$start")" -lt "$TIMEOUT" ] || fail "the coordinator did not register the sites within $TIMEOUT s"
        sleep 2
    done
    "${COMPOSE[@]}" up -d --no-build --no-deps "${SITES[@]/#/hospital-}" >>"$LOGS/compose-up.log" 2>&1 \
        || fail "podman-compose up (hospitals): $(tail -n 1 "$LOGS/compose-up.log")"
    while [ "$(podman inspect -f '{{.State.Running}}' "$coordinator" 2>/dev/null)" = true ]; do
        [ "$(elapsed "$start")" -lt "$TIMEOUT" ] || { save_logs; fail "the federation did not finish within $TIMEOUT s (logs: $LOGS)"; }
        sleep 5
    done
    save_logs
    local rc; rc=$(podman inspect -f '{{.State.ExitCode}}' "$coordinator" 2>/dev/null)
    [ "$rc" = 0 ] || fail "the coordinator exited with $rc: $(grep -m1 'error' "$LOGS/coordinator.log" || tail -n 1 "$LOGS/coordinator.log")"
    say "federation finished in $(elapsed "$start") s"
}

container() {  # the container id of a compose service of this project
    podman ps -aq --filter "label=com.docker.compose.project=$PROJECT" --filter "label=com.docker.compose.service=$1"
}

registered_sites() {  # how many sites the coordinator has registered so far
    python3 -c "import json, sys; print(len(json.load(open(sys.argv[1]))))" "$1" 2>/dev/null || echo 0
}

save_logs() {
    local service
    for service in coordinator "${SITES[@]/#/hospital-}"; do
        podman logs "$(container "$service")" >"$LOGS/$service.log" 2>&1 || true
    done
}

check_results() {
    local run=$RUN/state/coordinator/run
    [ -s "$run/model.safetensors" ] || fail "no exported model in $run"
    python3 - "$run/history.json" "$ROUNDS" <<'EOF' || fail "history check failed: $(cat "$LOGS/history-check.txt" 2>/dev/null)"
import json, sys
rows = json.load(open(sys.argv[1]))
rows = rows["rounds"] if isinstance(rows, dict) else rows
replied = [r.get("sites_replied") for r in rows]
if len(rows) != int(sys.argv[2]) or any(n != 3 for n in replied):
    sys.exit(f"expected {sys.argv[2]} rounds with 3 sites each, got {replied}")
EOF
    for site in "${SITES[@]}"; do
        in_image "$CLIENT_IMAGE" leuk-client -v "$RUN/state/$site:/state:ro" -- audit verify --audit-log /state/audit.jsonl \
            >"$LOGS/audit-$site.log" 2>&1 || fail "audit log of $site does not verify: $(tail -n 1 "$LOGS/audit-$site.log")"
    done
    # Nothing secret or patient-like went into an image: no keys, certificates or dataset images.
    local image leaked
    for image in "$SERVER_IMAGE" "$CLIENT_IMAGE"; do
        leaked=$(podman run --rm --no-healthcheck --network none --user 0 --entrypoint sh "$image" -c \
            "find / -xdev \( -name '*.key' -o -name 'ca.crt' -o -name 'server.pem' -o -name 'cell_*.png' -o -name 'site.pub' \) -print | head -n 3" 2>/dev/null) \
            || fail "could not list $image's files"
        [ -z "$leaked" ] || fail "$image contains $(echo "$leaked" | tr '\n' ' ')"
    done
    say "model exported ($(du -h "$run/model.safetensors" | cut -f1)), $ROUNDS rounds x 3 sites, audit logs verify: $(tail -qn 1 "$LOGS"/audit-h*.log | tr '\n' ';')"
}

cleanup() {
    local rc=$?
    trap - EXIT
    if [ -n "${CONTAINERS_CONF:-}" ]; then
        "${COMPOSE[@]}" down >"$LOGS/down.log" 2>&1 || true
        podman ps -aq --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman rm -f >/dev/null 2>&1 || true
        podman network ls -q --filter "label=io.podman.compose.project=$PROJECT" | xargs -r podman network rm -f >/dev/null 2>&1 || true
        if [ "${LEUK_E2E_KEEP_IMAGES:-0}" != 1 ]; then
            podman rmi -f "$SERVER_IMAGE" "$CLIENT_IMAGE" >/dev/null 2>&1 || true
            podman image prune -f >/dev/null 2>&1 || true  # this build's intermediate layers (our storage only)
        fi
    fi
    if [ "${LEUK_E2E_KEEP_RUN:-0}" != 1 ] && [ -n "${RUN:-}" ]; then rm -rf "$RUN"; fi
    exit "$rc"
}

main() {
    local start; start=$(date +%s)
    preflight
    trap cleanup EXIT
    trap 'exit 130' INT TERM
    podman_env
    base_image
    wheelhouse
    build server "$SERVER_IMAGE"
    build client "$CLIENT_IMAGE"
    certificates_and_data
    federation
    check_results
    say "passed in $(elapsed "$start") s (logs: $LOGS)"
}

main "$@"; exit  # one line: bash never reads this file again once main runs
