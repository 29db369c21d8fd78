"""The idle policy: donate this machine only while its owner is not using it.

:mod:`crowdd.idle.policy` (the rules and their verdict), :mod:`crowdd.idle.schedule` (the
weekly schedule grammar), :mod:`crowdd.idle.probes` (logind, CPU and battery readings).
"""
