"""Moving the protocol's messages: gRPC wire encoding, channel settings, TLS, Flower records."""
