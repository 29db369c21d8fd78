"""The client side shared by the CLI, the TUI and the Windows service: where the daemon is
(:mod:`crowdd.client.resolve`) and how to talk to it (:mod:`crowdd.client.daemon_client`)."""
