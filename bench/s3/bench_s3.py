"""Loopback throughput of S3Storage against a local SeaweedFS (weed mini)."""
import os, sys, time, tempfile
from drmerge_ops.devservers import start_seaweedfs
from drmerge.s3 import S3Storage
MiB = 1 << 20
SIZE = int(os.environ.get("SIZE_MIB", "256")) * MiB

def hwm(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM"): return line.split()[1]

d = tempfile.mkdtemp(prefix="s3bench-")
t = time.perf_counter(); srv = start_seaweedfs(d); start_s = time.perf_counter() - t
print(f"seaweedfs ready in {start_s:.2f}s, VmHWM {hwm(srv.pid)} kB")
try:
    c = srv.client(); c.create_bucket(Bucket="bench")
    data = os.urandom(SIZE)
    for upc in (1, 2, 4):
        st = S3Storage("s3://bench/x/", upload_concurrency=upc, **srv.s3_options())
        best = 1e9
        for rep in range(2):
            t = time.perf_counter()
            w = st.open_writer("blob.bin")
            mv = memoryview(data)
            for i in range(0, SIZE, 3 * MiB + 1): w.write(mv[i:i + 3 * MiB + 1])
            w.commit()
            best = min(best, time.perf_counter() - t)
        print(f"write upload_concurrency={upc}: {SIZE / MiB / best:.0f} MiB/s")
        st.close()
    for part, conc in ((1 << 40, 1), (16 * MiB, 1), (16 * MiB, 4), (16 * MiB, 8), (8 * MiB, 8), (64*MiB, 4)):
        st = S3Storage("s3://bench/x/", read_part_size=part, max_concurrency=conc, **srv.s3_options())
        best = 1e9
        for rep in range(3):
            t = time.perf_counter()
            got = st.read_range("blob.bin", 0, SIZE)
            best = min(best, time.perf_counter() - t)
        assert got == data
        label = "unsplit" if part == 1 << 40 else f"{part // MiB}MiB parts x{conc}"
        print(f"read {label}: {SIZE / MiB / best:.0f} MiB/s")
        st.close()
    # Many small tensor-sized reads (what the checkpoint reader does for biases/norms).
    st = S3Storage("s3://bench/x/", **srv.s3_options())
    t = time.perf_counter(); n = 300
    for i in range(n): st.read_range("blob.bin", i * 4099, 4096)
    print(f"small 4 KiB ranged GET latency: {(time.perf_counter() - t) / n * 1000:.1f} ms")
    print(f"seaweedfs VmHWM after run: {hwm(srv.pid)} kB")
finally:
    srv.stop()
