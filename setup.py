from setuptools import find_packages, setup

setup(
    name="aoaiproxy",
    version="0.1.0",
    description=(
        "A Twisted daemon that lets OpenAI clients use Azure OpenAI, "
        "and an HTTPS forward proxy to the OpenAI API."
    ),
    long_description=open("README.rst", encoding="utf-8").read(),
    long_description_content_type="text/x-rst",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(exclude=["tests*"]) + ["twisted.plugins"],
    package_data={"aoaiproxy": ["py.typed"], "twisted": ["plugins/aoaiproxy_plugin.py"]},
    install_requires=[
        "twisted[tls]>=24.7",
        "pyopenssl>=24",
        # Imported by aoaiproxy.tls; load_pem_x509_certificates is from 39.
        "cryptography>=39",
        "service-identity>=24",
        "attrs>=23",
        # aoaiproxy.metrics: --metrics-listen (a recent one: multiprocess "livemostrecent" gauges).
        "prometheus_client>=0.20",
        # Entra ID (aoaiproxy.backends.entra); imported only when a backend has auth = "entra".
        "azure-identity>=1.16",
        # The upstream client's HTTP/1.1 response parser (llhttp), in place of twisted.web.client.Agent.
        "httptools>=0.6",
        "tomli>=2; python_version<'3.11'",
    ],
    extras_require={
        "test": [
            "pytest",
            "pytest-twisted",
            # The tests' HTTP client; the daemon relays with aoaiproxy.upstream (README, "Quick start").
            "treq>=24.9",
            "openai>=1.40",
            "httpx",
            "hypothesis",
            "mypy",
            "mypy-zope",
            "ruff",
            "docutils",
            # tests/test_metrics.py reads the example Prometheus rules.
            "pyyaml",
        ],
    },
    entry_points={"console_scripts": ["aoaiproxy-fake-azure=aoaiproxy.testing:main"]},
    classifiers=["Framework :: Twisted", "Programming Language :: Python :: 3"],
)
