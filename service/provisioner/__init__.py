"""eBuilder Provisioner: paid Stripe checkout in, live store behind nginx out."""
