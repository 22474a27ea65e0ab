"""Team sizes and warps for the GRU and LSTM at 16,1000,32,128 (ms per forward+backward, median of 20)."""
import sys
sys.argv = ["x", "--none"]
exec(open(".gpuprobe/team_probe.py").read().split('if "--time"')[0])
for kind, shape, teams in [("GRU", (16, 1000, 32, 128), [None, 2, 8]), ("LSTM", (16, 1000, 32, 128), [None]),
                           ("RNN", (16, 1000, 32, 128), [None])]:
    for warps in (4, 8, 2):
        pallas.NUM_WARPS = warps
        pallas._compiler_params.cache_clear()
        row = {}
        for team in teams:
            try:
                call, _ = make(kind, shape, team=team)
                row[f"team {team or 'default'}"] = median(call)
            except Exception as e:  # noqa: BLE001
                print("error", kind, team, warps, type(e).__name__, str(e)[:300], flush=True)
        print(kind, shape, f"warps {warps}:", " | ".join(f"{k}: {v * 1e3:.2f} ms" for k, v in row.items()),
              flush=True)
