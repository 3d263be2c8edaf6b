"""`mallwatt portal`: the merchant self-service service (issue 15).

A read model of the stream's results (readmodel, fed from Kafka by feed), payment-provider
webhooks that turn signed notifications into Payments on mallwatt.payments (providers,
payments), merchant and operator tokens (auth), and one aiohttp app serving the JSON API,
its OpenAPI document and the mobile page (app, openapi, static/).
"""
