"""Speed and memory benchmarks: ours against the strongest alternatives, side by side."""
