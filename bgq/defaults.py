"""Every default and fixed limit of bgq, with its unit; settings and the contract read from here."""

from typing import Literal

# Settings defaults (overridable through BGQ_* environment variables, see bgq.settings).
MODEL = "u2netp"
# rembg models that run locally from a name alone (no custom weights path, prompt or credentials).
MODELS = frozenset(
    {
        "birefnet-cod",
        "birefnet-dis",
        "birefnet-general",
        "birefnet-general-fp16",
        "birefnet-general-lite",
        "birefnet-hrsod",
        "birefnet-massive",
        "birefnet-portrait",
        "bria-rmbg",
        "isnet-anime",
        "isnet-general-use",
        "silueta",
        "u2net",
        "u2net_cloth_seg",
        "u2net_human_seg",
        "u2netp",
    }
)
ORT_THREADS = 1  # intra-op threads per worker process
ORT_ARENA = True  # onnxruntime's CPU memory arena
ORT_MEM_PATTERN = False  # onnxruntime's memory pattern; on: ~190 MiB more per process, no faster
ORT_MEM_REUSE = False  # onnxruntime's planned buffer reuse; on: ~100 MiB more, no faster
MAX_TASKS_PER_CHILD = 200  # tasks before a pool process is replaced
MAX_MEMORY_PER_CHILD_MB = 2048  # MiB of resident memory before a pool process is replaced
MAX_MEGAPIXELS = 50.0  # megapixels (width x height / 1e6) an input may have
PNG_ENCODER: Literal["fast", "pillow"] = "fast"  # fast: numpy + ISA-L (~8 ms/1080p), pillow: zlib
QUALITY = 90  # 1-100, webp and jpeg quality when a request does not set one
CANVAS_MAX_SIDE = 8000  # pixels, the largest canvas side a request may ask for
FIT_MAX_MEGAPIXELS = 1000  # megapixels, the largest fit_megapixels a request may ask for
PNG_COMPRESS_LEVEL = 6  # zlib level 0-9 of the "pillow" encoder; 6 is Pillow's and rembg's default
TASK_MAX_RETRIES = 5  # retries of a task that failed with a transient error
MAX_DELIVERIES = 3  # times a job may kill its worker process (crash, OOM) before it fails for good

# Memory model of a pool process (BGQ_ORT_THREADS=1; measured, see docs/memory.md):
# peak MiB = POOL_RUNTIME_MIB + MODEL_SESSION_MIB of each model whose session the process holds
# (summed) + (MiB per megapixel of the options) x input megapixels, plus MATTING_MIB with alpha
# matting. A worker refuses, before decoding, an input whose estimated peak is over
# BGQ_MAX_MEMORY_PER_CHILD_MB. The per-megapixel terms are rembg's image work, the same for
# every model (each runs at 320x320): u2net's table rows grow by 14-18 MiB per MP, u2netp's 16-20.
POOL_RUNTIME_MIB = 150  # MiB: interpreter and libraries, before any session
# MiB per session held: weights, onnxruntime's working memory for one 320x320 inference (the
# arena keeps it) and the peak while loading. Measured (`make bench-models`, 2 cores): above the
# libraries of a probe process, u2netp 191, u2net 426 (its loading's peak; 352 once loaded, its
# parsed protobuf trimmed away, and run), both together 545; in pool processes, the largest
# VmHWM - 17 x MP of the table's rows, two runs: u2netp 300-302, u2net 533-546 (u2netp's + 244 at
# most; u2net's is loading's peak, at 640x480).
MODEL_SESSION_MIB = {"u2netp": 200, "u2net": 440}
# A model not measured here (isnet, birefnet, ...): its weights file's
# MiB x u2net's session MiB per weights MiB (440 / 167.8 = 2.62: loading holds the file's bytes,
# the parsed graph and the session's copy at once), and at least u2net's 440 (its working memory
# for one inference); u2net's 440 while the file's size is unknown. birefnet-general's 928 MiB of
# weights: 2,432 MiB, over the default limit, so give its workers a higher one (docs/memory.md).
U2NET_WEIGHTS_MIB = 175_997_641 / 2**20  # MiB: u2net.onnx (167.8)
SESSION_MIB_PER_WEIGHTS_MIB = MODEL_SESSION_MIB["u2net"] / U2NET_WEIGHTS_MIB  # 2.62
UNMEASURED_SESSION_MIB = MODEL_SESSION_MIB["u2net"]  # MiB: the least an unmeasured model gets
POOL_BASE_MIB = POOL_RUNTIME_MIB + MODEL_SESSION_MIB[MODEL]  # MiB: a process holding u2netp (350)
CUTOUT_MIB_PER_MP = 17  # MiB per megapixel: a cutout, with or without bgcolor
MASK_MIB_PER_MP = 8  # MiB per megapixel: only_mask
POST_PROCESS_MIB_PER_MP = 24  # MiB per megapixel: post_process_mask
MATTING_MIB = 150  # MiB: numba and pymatting, imported by a process's first alpha matting
MATTING_MIB_PER_MP = 420  # MiB per megapixel: alpha matting
# Shaped or non-PNG outputs (workers/shaping.py) peak after rembg, once the input is freed:
# POOL_BASE_MIB + SHAPING_HELD_MIB_PER_MP x input MP (x 2 with crop: the cutout and its crop)
# + SHAPING_MIB_PER_MP[format] x output MP (the canvas's, else the input's). Measured (VmHWM)
# per canvas megapixel on 64 MP canvases: png 6.4, png or jpeg with bgcolor 11, webp 25 (libwebp's
# own buffers); webp of a 48 MP input 30.
SHAPING_HELD_MIB_PER_MP = 4  # MiB per input megapixel: the RGBA cutout kept while shaping
# MiB per output megapixel, by format (zip: its RGB copy, its alpha plane, the encoders')
SHAPING_MIB_PER_MP = {"png": 12, "jpeg": 12, "webp": 32, "zip": 12}
# bg_image adds BACKGROUND_MIB_PER_MP x (background MP + output MP): the decoded background,
# its RGB copy, Lanczos's intermediate rows, the covered frame and the composite (RGB each).
# Measured (peak RSS above the process before shaping, 12 MP output): an RGBA 48 MP background
# 730 MiB (estimated 1,150 above POOL_BASE_MIB), RGB 48 MP on an 8000x8000 canvas 860 (2,600);
# a zip 47 (190).
BACKGROUND_MIB_PER_MP = 16  # MiB per megapixel of background and of output
# Its file counts at its exact size in both phases: read before the input and held while rembg
# runs, then freed once the background is decoded (workers/backgrounds.py `decoded`).
# Images up to the input's size that scale (workers/layout.py) makes at once, besides the
# cutout and the step before's: the subject, its premultiplied copy, Lanczos's pass and result
# (then the new frame); and those fit_megapixels adds per output megapixel (the frame's
# premultiplied copy and a pass). Measured (VmHWM) on a 24 MP cutout: at most 455 MiB for
# scale, 700 with roi, fit and webp, against estimates of 768 and 1536.
SCALE_FRAMES = 4
FIT_FRAMES = 2

# Queue and keys.
QUEUE = "bgq"  # Celery queue the workers consume and the producer publishes to
KEY_PREFIX = "bgq:"  # prefix of every Redis key bgq itself writes (Celery's own keys aside)
GUARD_TTL = 3600  # seconds an enqueue guard lives; it is released when the job ends
# Seconds a guard lives until its task is sent (then GUARD_TTL): how long a producer killed in
# between holds the job up; well above a publish's own retries (3, each within the 4 s connect
# timeout), so a slow publish does not outlive its guard.
GUARD_PUBLISH_TTL = 60
# Lanes (bgq/lanes.py): the bulk queue is kept as deep as the live workers' bulk pool processes,
# at least BULK_MIN_READY; one scheduling pass looks at BULK_DISPATCH_STEPS runs' lists at most.
BULK_MIN_READY = 2
BULK_DISPATCH_STEPS = 1000
WORKER_BEAT = 5  # seconds between a worker's capacity entries (and scheduling passes)
WORKER_ENTRY_TTL = 20  # seconds a worker's capacity entry counts without a new one
# Seconds a producer trusts that a model is served before reading the workers' entries again (a
# refusal is always read fresh: bgq/errors.py ModelNotServed, producer/served.py).
SERVED_MEMO = 1.0
WORKER_ALIVE_STALE = 60  # seconds without a beat after which `bgq probe alive` may fail
SWEEP_INTERVAL = 60  # seconds between sweeps for bulk runs lost from the scheduler's ring
RESULT_TTL = 86400  # seconds Celery keeps a task's result/state in Redis
TASK_TIME_LIMIT = 600  # seconds one task may run before its pool process is killed (fails it)
MASK_LOCK_TTL = 120  # seconds a model run may hold its mask's lock (then others go ahead too)
MASK_WAIT = 120  # seconds a task waits for another process's model run of the mask it needs
MASK_POLL = 0.1  # seconds between its tries of the lock meanwhile
# Leases (workers/leases.py): a job a worker holds is renewed every LEASE/6 s while it lives;
# one not renewed for LEASE seconds goes back to the head of its queue (any live worker sweeps).
LEASE = 30  # seconds (BGQ_LEASE); must be the same on every worker of a Redis
LEASE_MUTEX_EXPIRE = 20  # seconds a sweeper killed while sweeping blocks other sweeps at most
MAX_STARTS = 10  # starts of a job without a finish (whole hosts lost) before it fails for good

# Retries of transient errors: exponential backoff with full jitter.
RETRY_BACKOFF_MAX = 60  # seconds, cap of one backoff
RETRY_BACKOFF_BASE = 1  # seconds, first backoff before jitter

# Local stack.
WORKER_READY_TIMEOUT = 120  # seconds `bgq up` waits for its worker to answer a ping
WORKER_STOP_TIMEOUT = 30  # seconds a stopping Flower may take before it is killed

# Graceful scale-down (workers/shutdown.py).
SHUTDOWN_GRACE = 25.0  # seconds running jobs may finish after SIGTERM
# Seconds past the grace to hand jobs back and exit, before a SIGKILL: `bgq up` waits this,
# deploy/ gives grace + this (40 s: Kubernetes' default 30 s is raised, docs/operations.md).
SHUTDOWN_MARGIN = 15.0
DRAIN_TICK = 0.2  # seconds between a stopping worker's checks of its running jobs
DRAIN_STALL = 5.0  # seconds without a tick after which a stopping worker's event loop is stuck
REDIS_READY_TIMEOUT = 10  # seconds to wait for an embedded redis-server to answer

# Redis connections (bgq.connections).
REDIS_CONNECT_TIMEOUT = 5.0  # seconds to open a connection to Redis or a Sentinel
REDIS_SOCKET_TIMEOUT = 30.0  # seconds one Redis command may take
SENTINEL_SOCKET_TIMEOUT = 1.0  # seconds a Sentinel may take to name the master (then the next)
BROKER_RETRY_SECONDS = 120.0  # seconds producers retry Redis through an outage before failing
BROKER_RETRY_BASE = 0.2  # seconds, ceiling of the first retry delay (then doubling, jittered)
BROKER_RETRY_MAX = 5.0  # seconds, cap of one retry delay
JOB_TIMEOUT = 300  # seconds `bgq submit` waits for a result by default
# A waiting job (Job.wait, the API's wait) reads its state after JOB_POLL_FIRST, then after each
# gap doubled, up to JOB_POLL_MAX.
JOB_POLL_FIRST = 0.01  # seconds, the first gap between a waiting job's state reads
JOB_POLL_MAX = 0.25  # seconds, the longest gap between them

# Cache statistics and lifecycle.
STATS_FLUSH_INTERVAL = (
    1.0  # seconds a producer batches its cache-hit count before adding it in Redis
)
USE_RESOLUTION = (
    30.0  # seconds: a hit re-stamps a result's mtime (its last use) when older than this
)
SEEN_RESULTS = 10_000  # results a process remembers as recently used (skips a store lookup)
PRUNE_MIN_IDLE = 60.0  # seconds since last use within which prune never deletes a result
PRUNE_INPUT_GRACE = (
    600.0  # seconds an unreferenced input blob is kept (a producer may be enqueueing)
)
PRUNE_TMP_AGE = 3600.0  # seconds after which a leftover temporary file in the store is removed
PRUNE_INTERVAL = 3600.0  # seconds between the beat schedule's prune runs
PRESIGN_SECONDS = 900  # seconds a presigned result URL stays valid (BGQ_RESULT_REDIRECT)
S3_TIMEOUT = 30.0  # seconds one try of an S3 request may wait for data (connect: at most 5)
S3_CONNECT_TIMEOUT = 5.0  # seconds to connect to the S3 endpoint, at most
S3_MAX_ATTEMPTS = 5  # tries of one S3 request (timeouts, 5xx, throttling) before StoreError
S3_POOL_CONNECTIONS = 32  # HTTP connections one S3 client keeps (the API's threads share it)
STORE_SCAN_INTERVAL = 60.0  # seconds the exporter reuses one scan of the store's size
STORE_STREAM_CHUNK = 1 << 20  # bytes per piece when a result is streamed out of the store
PRUNE_LOOKUP_BATCH = 500  # Redis lookups (in-flight checks) per round trip while pruning

# Monitoring.
FLOWER_PORT = 5555
FLOWER_PURGE_OFFLINE = 60  # seconds after which Flower drops a worker that went offline
# The columns of Flower's tasks page: its defaults, and the routing key (the task's lane: `bgq`,
# or `bgq.bulk.<run>` for a bulk job, as the producer sent it).
FLOWER_TASKS_COLUMNS = "name,uuid,state,routing_key,received,started,runtime,worker"
EXPORTER_PORT = 9808

# Ingestion (`bgq ingest`).
INGEST_WINDOW = 128  # jobs one ingest keeps outstanding; make it >= 2 x the cluster's processes
# While none of its outstanding jobs finishes, an ingest reads their states (one round trip)
# after INGEST_POLL_FIRST, then after each gap x 1.5, up to INGEST_POLL_MAX.
INGEST_POLL_FIRST = 0.02  # seconds, the first gap between an ingest's reads of its jobs' states
INGEST_POLL_MAX = 0.2  # seconds, the longest gap between them
INGEST_LOST_CHECK = 1.0  # seconds between checks that a pending job still has its guard (else lost)
INGEST_STALL_WARNING = 60.0  # seconds with no finished job before ingest checks for workers

# HTTP API (`bgq api`).
API_HOST = "127.0.0.1"
API_PORT = 8000
MAX_UPLOAD_MB = 25.0  # MiB a request body may have
API_WAIT = 30.0  # seconds POST /v1/remove waits for a result by default
API_MAX_WAIT = 300.0  # seconds a request may ask to wait at most
API_BROKER_RETRY_SECONDS = 5.0  # seconds an API request waits out a Redis outage, then 503
API_RETRY_AFTER = 5  # seconds a 503 (Redis or the store unavailable) asks clients to wait
# Seconds a 503 for a model no live worker serves asks clients to wait: a worker's entry lives
# this long, so the capacity the refusal read changes on this scale (a new worker registers at
# its start, a vanished one drops out within it).
API_MODEL_RETRY_AFTER = WORKER_ENTRY_TTL
API_LIMIT_RETRY_AFTER = 5  # seconds a 429 for a key's jobs outstanding asks clients to wait

# Webhooks.
WEBHOOK_MAX_RETRIES = 10  # retries of a failed delivery: ~15 min on average, 27 min at most
WEBHOOK_BACKOFF_BASE = 2.0  # seconds, ceiling of the first retry's delay (then doubling, jittered)
WEBHOOK_BACKOFF_MAX = 600  # seconds, cap of one delivery backoff
WEBHOOK_TIMEOUT = 10.0  # seconds per step of one delivery (connect, each read); 2x in all
WEBHOOK_SIGNATURE_HEADER = "X-Bgq-Signature"  # "sha256=<hex HMAC-SHA256 of the body>"

# Fetching images by URL (bgq.fetch).
FETCH_TIMEOUT = 30.0  # seconds one whole fetch may take: every redirect, connect and the body
FETCH_MAX_REDIRECTS = 3  # redirects one fetch follows, each hop's address checked again
FETCH_CONCURRENCY = 8  # fetches one `bgq ingest` runs at once (--fetch-concurrency)
API_FETCH_CONCURRENCY = 16  # image_url fetches one `bgq api` process runs at once (the rest wait)


def unknown_model_hint(name: str) -> str | None:
    """None if bgq runs the rembg model `name`; else the choices, for the caller's error."""
    return None if name in MODELS else f"choose one of {', '.join(sorted(MODELS))}"
