"""Neural-network building blocks shared by matkit models."""
