"""Running and watching the gateway: server, admin API, metrics, reload, ledger."""
