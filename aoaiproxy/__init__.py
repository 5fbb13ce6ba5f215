"""aoaiproxy: an OpenAI API gateway to Azure OpenAI and a forward proxy, on Twisted."""

__version__ = "0.1.0"
