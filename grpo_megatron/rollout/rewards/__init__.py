"""Rewards: the reward functions and their resolution by name (functions.py), the HTTP reward service's client
(remote.py), and the runner that scores a batch with every configured function (runner.py)."""
