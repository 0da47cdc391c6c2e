"""The client side: TLS, the HTTP/1.1 connection and who the caller is."""
