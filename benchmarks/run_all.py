"""Run every benchmark (``make bench``); results land in benchmarks/results/*.json."""

from benchmarks import scan_memory, scan_overhead, scan_vs_naive


def main() -> None:
    for module in (scan_overhead, scan_vs_naive, scan_memory):
        print(f"== {module.__name__}", flush=True)
        module.main()


if __name__ == "__main__":
    main()
