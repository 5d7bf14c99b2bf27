def main() -> None:  # placeholder until the CLI lands
    raise SystemExit("jobcage: not built yet")
