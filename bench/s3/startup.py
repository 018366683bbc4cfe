"""SeaweedFS (weed mini) startup-to-ListBuckets time, idle and loaded peak RSS."""
import os, statistics, tempfile, time
from drmerge_ops.devservers import start_seaweedfs, start_redis
def hwm(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM"): return int(line.split()[1]) // 1024
ups, stops, idle = [], [], []
for i in range(5):
    t = time.perf_counter(); s = start_seaweedfs(tempfile.mkdtemp()); ups.append(time.perf_counter() - t)
    idle.append(hwm(s.pid))
    t = time.perf_counter(); s.stop(); stops.append(time.perf_counter() - t)
r = []
for i in range(5):
    t = time.perf_counter(); h = start_redis(tempfile.mkdtemp()); r.append(time.perf_counter() - t); h.stop()
print(f"weed mini ready: median {statistics.median(ups):.2f}s (min {min(ups):.2f}, max {max(ups):.2f}); "
      f"stop median {statistics.median(stops):.2f}s; idle VmHWM {statistics.median(idle)} MiB")
print(f"redis ready: median {statistics.median(r)*1000:.0f} ms")
