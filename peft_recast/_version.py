"""The version of peft_recast (saved in every adapter config as ``recast_version``); imports nothing."""

__version__ = "0.1.0"
