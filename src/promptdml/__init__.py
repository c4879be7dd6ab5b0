"""promptdml: parameter-efficient deep metric learning with semantic proxies from visual prompts."""

__version__ = "0.1.0"
