from twisted.application.service import ServiceMaker

aoaiproxy = ServiceMaker(
    "aoaiproxy",
    "aoaiproxy.tap",
    "OpenAI API gateway to Azure OpenAI, and HTTPS forward proxy to the OpenAI API.",
    "aoaiproxy",
)
