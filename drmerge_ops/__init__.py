"""Operations around the engine and the service: the ``drmerge`` console script, the
service launchers, the local dev stack and its servers, key administration and the
terminal client.

The top layer of the project: it may import every other package (drmerge, service,
worker, drmerge_client), and none of them imports it.
"""
