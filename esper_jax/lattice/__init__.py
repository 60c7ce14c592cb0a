"""The growable model: hosts with injection points (``hosts``), the blueprints seeds are made
from (``blueprints``), slot ids (``slots``), a seed's lifecycle (``lifecycle``) and blending
(``blending``), every slot's seed state and its transitions (``grid``), the forward with seeds at
the injection points (``model``), how a population of members runs (``strategy``) and the
host/seed training step (``training``, ``optim``). Nothing here knows about controllers."""
